"""cluster/grafana-tributary.json charts every tributary_* metric the coordinator and the
server export, and only those (a renamed metric would leave an empty panel)."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def exported_metrics() -> set[str]:
    sources = [REPO / "trainer" / "metrics.py", REPO / "trainer" / "serve" / "metrics.py"]
    return {m for path in sources for m in re.findall(r'"(tributary_[a-z_]+)"', path.read_text())}


def test_every_exported_metric_has_a_panel_and_every_query_a_metric():
    dashboard = json.loads((REPO / "cluster" / "grafana-tributary.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m.removeprefix("ray_").removesuffix("_bucket")  # a histogram's series
            for e in exprs for m in re.findall(r"ray_tributary_[a-z_]+", e)}
    assert used == exported_metrics()
    assert all('run=~"$run"' in e for e in exprs)  # the run picker filters every panel
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "run"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
