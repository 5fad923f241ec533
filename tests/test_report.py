import builtins
import json

from helpers import micro_config
from nanojax import report


def _fake_run(root, name, kind, steps=20, evals=None, mfu=True):
    run = root / name
    run.mkdir(parents=True)
    c = micro_config(run)
    c.run_name = name
    c.data.kind = kind
    (run / "config.json").write_text(c.to_json_best_effort(indent=2))
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": 5.0 - 0.1 * s, "tokens_per_s": 1000.0, "step_time_s": 0.5}
        if mfu:
            rec["mfu"] = 0.4
        lines.append(json.dumps(rec))
        if s % 10 == 0:
            lines.append(json.dumps({"step": s, "val_loss": 4.0, "val_bpb": 1.5 - 0.01 * s}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if evals:
        (run / "eval_results.json").write_text(json.dumps(evals))
    return run


def test_report_card_for_a_pipeline(tmp_path):
    base = _fake_run(tmp_path, "base_micro", "synthetic",
                     evals={"core": {"core_metric": 0.1234, "results": {}, "centered_results": {}},
                            "bpb": {"bpb": 1.3}})
    sft = _fake_run(tmp_path, "chat_micro", "chat", mfu=False,
                    evals={"mmlu": {"accuracy": 0.3, "passed": 3, "total": 10},
                           "chatcore": {"accuracy": 0.05, "tasks": ["mmlu"], "complete": False}})
    out = report.main([str(base), str(sft), "--out", str(tmp_path / "card" / "report.md")])
    text = out.read_text()
    assert "## Environment" in text and "| jax |" in text
    assert "## base_micro (base (synthetic data))" in text and "## chat_micro (sft)" in text
    assert "| parameters | 132,224 |" in text or "| parameters |" in text
    assert "| tokens trained | 5,120 |" in text  # 20 steps × 256 tokens
    assert "| MFU | 40.0% |" in text
    assert "| val bpb final / min | 1.3000 / 1.3000 |" in text
    assert "| CORE | 0.1234 | - | 0.2219 |" in text
    assert "| MMLU | - | 0.3000 | 0.3151 |" in text
    assert "| val bpb | 1.3000 | - | - |" in text
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "card" / "loss.png").exists() and "![training loss](loss.png)" in text
    except ImportError:
        assert "matplotlib is not installed" in text


def test_report_without_matplotlib_says_so(tmp_path, monkeypatch):
    run = _fake_run(tmp_path, "r", "fineweb")
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    text = report.main([str(run)]).read_text()
    assert "pip install matplotlib" in text
    assert (run / "report.md").exists()


def test_report_tolerates_a_cut_metrics_line_and_no_evals(tmp_path):
    run = _fake_run(tmp_path, "r", "fineweb", steps=3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    s = report.run_summary(run)
    assert s["steps"] == 3 and s["evals"] == {} and s["stage"] == "base"


def test_stage_names_old_and_new_kinds(tmp_path):
    assert report.run_summary(_fake_run(tmp_path, "new", "sft", steps=2))["stage"] == "sft"
    assert report.stage("chat") == "sft"  # run configs written before the rename
    assert report.stage("mid") == "mid" and report.stage("future_kind") == "future_kind" and report.stage(None) == "?"
