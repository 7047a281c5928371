"""The manifest types (selfage_cli/manifest.py): a selfage.json written by the stages loads into them and is
written back byte for byte; a wrong-typed value is refused (exit 2) naming the field and the file."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfage_cli import manifest as mf
from selfage_cli.cli import app
from selfage_cli.errors import ManifestError
from selfage_cli.files import atomic_write_json
from selfage_cli.project import MANIFEST_NAME, Project

# Written by the real stages on the tiny model: align (2 references), label-ages, make-reg --count 2, train
# --steps 2, edit --paste-back of a raw photo (ages 20,60), edit again (60,70: a history record) and
# edit --aligned --source-age 30.
FIXTURE = Path(__file__).parent / "data" / "selfage_manifest_v1.json"


def _fixture() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def _as_written(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def test_manifest_written_by_the_stages_round_trips_byte_for_byte() -> None:
    text = FIXTURE.read_text(encoding="utf-8")
    typed = mf.Manifest.from_dict(json.loads(text), FIXTURE)
    assert _as_written(typed.to_dict()) == text
    # field for field: the types hold what the JSON holds
    assert [r.id for r in typed.references] == ["30_beach", "40_office"]
    assert typed.references[0].age_label.value == 30 and typed.references[0].age_label.source == "filename"
    assert typed.inputs[0].age_label.estimator == "builtin"
    assert typed.inputs[1].prealigned is True
    assert typed.regularisation.generated is True and len(typed.regularisation.images) == 2
    assert typed.runs[0].lora == f"runs/main/{mf.WEIGHT_NAME}" and typed.runs[0].finished is True
    edit = typed.edits[0]
    assert edit.target_ages == [20, 60, 70] and set(edit.outputs) == {"20", "60", "70"}
    assert [record.ages for record in edit.history] == [[20]]
    assert edit.full_outputs == {"20": "edits/25_holiday/20_full.png"}
    assert typed.config.base_model == _fixture()["config"]["base_model"]


def test_unknown_keys_and_order_are_kept_and_changes_land(tmp_path: Path) -> None:
    data = _fixture()
    data["future_section"] = {"x": 1}
    data["edits"][0]["future_key"] = [1, 2]
    data["references"][0] = {"zz": 1, **data["references"][0]}
    typed = mf.Manifest.from_dict(copy.deepcopy(data))
    assert typed.to_dict() == data and list(typed.to_dict()["references"][0])[0] == "zz"
    mf.set_age_label(typed.references[1], 41, "file", {"file": 41, "filename": 40})
    out = typed.to_dict()
    assert out["references"][1]["age"] == 41 and out["references"][1]["age_candidates"] == {"file": 41, "filename": 40}
    assert list(out["references"][1]) == list(data["references"][1])  # keys stay where they were


def test_typed_update_of_an_unchanged_manifest_rewrites_nothing(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text(FIXTURE.read_text(encoding="utf-8"))
    project = Project(tmp_path)
    before = (tmp_path / MANIFEST_NAME).read_bytes()
    with mf.update(project) as typed:
        assert mf.find(typed.inputs, "al") is not None
    assert (tmp_path / MANIFEST_NAME).read_bytes() == before
    with mf.update(project) as typed:
        mf.set_estimated_age(mf.find(typed.inputs, "al"), "dex", 33.7)
    again = json.loads((tmp_path / MANIFEST_NAME).read_text())
    entry = mf.find(again["inputs"], "al")
    assert entry["age"] == 34 and entry["age_source"] == "dex" and entry["age_candidates"]["dex"] == 33.7
    # everything else as it was, apart from the update time
    again["inputs"] = _fixture()["inputs"]
    assert {k: v for k, v in again.items() if k != "updated"} == {k: v for k, v in _fixture().items() if k != "updated"}


def _corrupt(where: str, value: object) -> dict:
    data = _fixture()
    if where == "references":
        data["references"] = value
    elif where == "aligned":
        data["references"][1]["aligned"] = value
    elif where == "outputs":
        data["edits"][0]["outputs"] = value
    elif where == "target_ages":
        data["edits"][0]["target_ages"] = value
    elif where == "base_model":
        data["config"]["base_model"] = value
    elif where == "history":
        data["edits"][0]["history"][0]["ages"] = value
    return data


@pytest.mark.parametrize(
    ("where", "value", "field"),
    [
        ("references", [1, 2, 3], "references[0]"),
        ("aligned", 42, "references[1].aligned"),
        ("outputs", ["../../outside.png"], "edits[0].outputs"),
        ("target_ages", "abc", "edits[0].target_ages"),
        ("base_model", 123, "config.base_model"),
        ("history", "20", "edits[0].history[0].ages"),
    ],
)
def test_wrong_typed_value_exits_2_naming_field_and_file(tmp_path: Path, where: str, value: object, field: str) -> None:
    path = tmp_path / MANIFEST_NAME
    atomic_write_json(path, _corrupt(where, value), ensure_ascii=False)
    before = path.read_bytes()
    with pytest.raises(ManifestError, match=re.escape(f"'{field}' has the wrong type")):
        Project(tmp_path).read()
    for command in (["doctor"], ["eval"], ["label-ages"]):
        result = CliRunner().invoke(app, [*command, "-p", str(tmp_path)])
        assert result.exit_code == 2, (command, result.output)
        flat = " ".join(result.output.split())
        assert f"'{field}'" in flat and MANIFEST_NAME in flat and "Traceback" not in result.output
    assert path.read_bytes() == before


def test_ids_are_allocated_in_one_place(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    entries = [{"id": "a_2"}]
    assert mf.allocate_id("a", entries, tmp_path) == "a_3"
    assert mf.allocate_id("my photo!", entries, tmp_path) == "my_photo"
    taken = {"b"}
    assert mf.reuse_or_allocate_id("b_2", "b", taken) == "b_2" and "b_2" in taken
    assert mf.reuse_or_allocate_id("other", "b", taken) == "b_3"


def test_a_section_absent_from_the_file_is_written_once_a_stage_fills_it(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "references": []}))
    project = Project(tmp_path)
    with mf.update(project) as typed:
        typed.config.base_model = "some/model"
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["config"] == {"base_model": "some/model"}
    assert "edits" not in json.loads((tmp_path / MANIFEST_NAME).read_text())
