"""Native zero-shot scoring on real PIQA / ARC requests agrees with a PyTorch computation of the same protocol."""

import json

import pytest

from modegpt_jax.zeroshot import encode, evaluate_task, load_requests, score
from tests.test_cli_errors import assert_user_error, run_cli

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("task", ["piqa", "arc_easy"])
def test_scores_match_pytorch(smollm2_models, task):
    ours, hf, tok = smollm2_models
    requests = load_requests(task, limit=6)
    assert len({r["doc_id"] for r in requests}) == 6 and len(requests) >= 12
    got = score(ours, tok, requests, batch_size=4, progress=False)
    for r, s in zip(requests, got):
        ids, n_cont = encode(tok, r["context"], r["continuation"])
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.as_tensor([ids])).logits[0, :-1], -1)
        ref = logp[torch.arange(len(ids) - 1), torch.as_tensor(ids[1:])][-n_cont:].sum().item()
        assert s == pytest.approx(ref, abs=2e-3)


def test_accuracy_is_better_than_chance(smollm2_models):
    ours, _, tok = smollm2_models
    result = evaluate_task(ours, tok, "piqa", limit=60, progress=False)
    assert result["docs"] == 60
    assert result["acc"] > 0.55  # two choices: chance is 0.5; SmolLM2-135M is well above it on PIQA


def test_unknown_task_is_a_user_error():
    assert_user_error(run_cli("eval", "--tasks", "no_such_task", "--limit", "2"), "no_such_task")


def test_cli_json(tmp_path):
    proc = run_cli("eval", "--tasks", "arc_easy", "--limit", "8", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tasks"]["arc_easy"]["docs"] == 8
    assert 0.0 <= result["average_acc"] <= 1.0
