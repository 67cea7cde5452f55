"""benchmarks/record.py: a benchmark's rerun replaces what it measured and keeps the file's other records."""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("record", Path(__file__).parents[1] / "benchmarks" / "record.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)


def test_a_rerun_keeps_the_other_records(tmp_path):
    path = tmp_path / "results" / "bench.json"
    record.update_results(path, {"args": {"a": 1}, "rows": [1]})
    data = json.loads(path.read_text())
    data["earlier_run"] = {"rows": [0]}  # a record added by hand, as the README's tables cite them
    path.write_text(json.dumps(data))
    record.update_results(path, {"args": {"a": 2}, "rows": [2]})
    record.update_results(path, {"args": {"a": 3}, "rows": [3]}, key="other_settings")
    assert json.loads(path.read_text()) == {"args": {"a": 2}, "rows": [2], "earlier_run": {"rows": [0]},
                                            "other_settings": {"args": {"a": 3}, "rows": [3]}}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_file_that_is_not_a_json_object_is_left_alone(tmp_path, text):
    path = tmp_path / "bench.json"
    path.write_text(text)
    with pytest.raises(SystemExit, match="left as it is"):
        record.update_results(path, {"rows": [1]}, key="run")
    assert path.read_text() == text
    assert json.loads((tmp_path / "bench.unmerged.json").read_text()) == {"run": {"rows": [1]}}
