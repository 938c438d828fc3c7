/* Hide CPU features from every CPUID a process executes, natively, so libraries that dispatch
 * on CPUID (ONNX Runtime's MLAS, numpy, oneDNN) pick the kernels of a CPU without them.
 *
 * Loaded with LD_PRELOAD. ONNXQ_CPUID_MASK holds up to 32 rules "LEAF,SUBLEAF,REG,MASK"
 * (hex, REG 0..3 = EAX..EDX), separated by spaces; each clears MASK's bits in that register.
 * Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, /proc/cpuinfo flag cpuid_fault) turns each
 * CPUID into SIGSEGV; the handler runs the real CPUID with faulting off, clears the bits and
 * steps over the instruction. Threads inherit faulting; exec clears it, and LD_PRELOAD renews it.
 * Without the kernel's support the process stops with exit code 3 rather than run unmasked.
 * The process's own SIGSEGV handlers (Python's faulthandler, abseil's failure handler) are
 * kept aside by an interposed sigaction() and get every fault that is not a CPUID. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
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
static int n_rules, active;

static struct sigaction app_action; /* the handler the process itself asked for */
static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);

static long set_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void pass_on(int sig, siginfo_t *info, void *context) {
    if (app_action.sa_handler == SIG_DFL || app_action.sa_handler == SIG_IGN) {
        struct sigaction fallback;
        memset(&fallback, 0, sizeof fallback);
        fallback.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &fallback, NULL); /* returning re-runs the fault: crash */
    } else if (app_action.sa_flags & SA_SIGINFO) {
        app_action.sa_sigaction(sig, info, context);
    } else {
        app_action.sa_handler(sig);
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        pass_on(sig, info, context);
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

int sigaction(int sig, const struct sigaction *action, struct sigaction *old) {
    if (real_sigaction == NULL) real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !active) return real_sigaction(sig, action, old);
    if (old != NULL) *old = app_action;
    if (action != NULL) app_action = *action;
    return 0;
}

__attribute__((constructor)) static void install(void) {
    real_sigaction = dlsym(RTLD_NEXT, "sigaction");
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
    if (real_sigaction(SIGSEGV, &action, &app_action) != 0 || set_faulting(1) != 0) {
        fputs("cpuid_mask: this kernel or CPU cannot fault on CPUID (no cpuid_fault)\n", stderr);
        _exit(3);
    }
    active = 1;
}
