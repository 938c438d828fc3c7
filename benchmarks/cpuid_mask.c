/* Hide CPU features from every CPUID a process executes, natively, so libraries that dispatch
 * on CPUID (ONNX Runtime's MLAS, numpy, oneDNN) pick the kernels of a CPU without them.
 *
 * Loaded with LD_PRELOAD. ONNXQ_CPUID_MASK holds up to 32 rules "LEAF,SUBLEAF,REG,MASK"
 * (hex, REG 0..3 = EAX..EDX), separated by spaces; each clears MASK's bits in that register.
 * Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, /proc/cpuinfo flag cpuid_fault) turns each
 * CPUID into SIGSEGV; the handler runs the real CPUID with faulting off, clears the bits and
 * steps over the instruction. Threads inherit faulting; exec clears it, and LD_PRELOAD renews it.
 * Without the kernel's support the process stops with exit code 3 rather than run unmasked. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012
#define MAX_RULES 32

struct rule { unsigned leaf, subleaf, reg, mask; };
static struct rule rules[MAX_RULES];
static int n_rules;

static long set_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void on_segv(int sig, siginfo_t *info, void *context) {
    (void)sig; (void)info;
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: crash as usual */
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    unsigned leaf = (unsigned)r[REG_RAX], subleaf = (unsigned)r[REG_RCX], out[4];
    set_faulting(0);
    __cpuid_count(leaf, subleaf, out[0], out[1], out[2], out[3]);
    set_faulting(1);
    for (int i = 0; i < n_rules; i++)
        if (rules[i].leaf == leaf && rules[i].subleaf == subleaf) out[rules[i].reg] &= ~rules[i].mask;
    r[REG_RAX] = out[0]; r[REG_RBX] = out[1]; r[REG_RCX] = out[2]; r[REG_RDX] = out[3];
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void install(void) {
    const char *spec = getenv("ONNXQ_CPUID_MASK");
    if (spec == NULL) return;
    for (int used = 0; n_rules < MAX_RULES; spec += used) {
        struct rule *x = &rules[n_rules];
        if (sscanf(spec, " %x,%x,%x,%x%n", &x->leaf, &x->subleaf, &x->reg, &x->mask, &used) != 4) break;
        if (x->reg < 4) n_rules++;
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    if (sigaction(SIGSEGV, &action, NULL) != 0 || set_faulting(1) != 0) {
        fputs("cpuid_mask: this kernel or CPU cannot fault on CPUID (no cpuid_fault)\n", stderr);
        _exit(3);
    }
}
