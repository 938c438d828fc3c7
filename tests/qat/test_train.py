"""``distill``: the fake-quant module of a small encoder moves towards its float teacher's
outputs, from feed dicts or tuples alike; a loss it does not know is refused."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from onnxq.errors import ConfigError  # noqa: E402
from onnxq.qat import distill, prepare_qat  # noqa: E402


def _cosine_gap(module, teacher, ids) -> float:
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(module(ids), teacher(ids), dim=-1)
    return float((1 - cos).mean())


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_distill_moves_the_student_towards_the_teacher(loss) -> None:
    from torch_models import SEQ, VOCAB, TinyEncoder

    torch.set_num_threads(2)
    teacher = TinyEncoder().eval()
    ids = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(0))
    module = prepare_qat(teacher, ids[:2], {"ids": ids.numpy()}, target="tensorrt")
    before = _cosine_gap(module, teacher, ids)
    dicts = [{"ids": ids[i : i + 16].numpy()} for i in range(0, 32, 16)]
    tuples = [(ids[i : i + 16],) for i in range(32, 64, 16)]
    losses: list[float] = []
    trained = distill(
        module,
        teacher,
        dicts + tuples,
        epochs=5,
        lr=1e-4,
        loss=loss,
        on_epoch=lambda epoch, value: losses.append(value),
    )
    assert trained is module and not module.training
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert _cosine_gap(module, teacher, ids) < before


def test_distill_refuses_an_unknown_loss() -> None:
    with pytest.raises(ConfigError, match="cosine"):
        distill(torch.nn.Identity(), torch.nn.Identity(), [], epochs=1, lr=1e-3, loss="l1")
