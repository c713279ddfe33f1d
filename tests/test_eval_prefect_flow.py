"""The `evaluate` Prefect flow on the demo benchmark folder: same outputs as the CLI, summary published as a
markdown artifact."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

pytest.importorskip("dlib")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from flows.eval_samples import write_eval_demo

    return write_eval_demo(tmp_path_factory.mktemp("eval_flow"), seconds=1.0, fps=8)


def test_prefect_flow_publishes_the_summary(demo, prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.evaluate import artifact_key, evaluate

    out = tmp_path / "out_flow"
    summary = evaluate(
        videos=str(demo["gen"] / "subject"),
        cases=str(demo["bench"] / "subject_consistent"),
        out=str(out),
        profile="test",
        overrides={"batch_size": 1},
    )
    (task,) = summary["tasks"]
    assert task["task"] == "subject" and task["metrics"]["binding_accuracy"] == 1.0
    (row,) = pq.read_table(out / "metrics.parquet").to_pylist()
    assert row["key"] == "binding_demo" and row["binding_accuracy"] == 1.0
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(str(out))]))
        )
    assert arts and "Subject-consistent" in arts[0].data and "Binding acc." in arts[0].data
