"""Metrics: TensorBoard event files (read back with an independent CRC-32C) and metrics.jsonl."""

import os

import numpy as np

from sdjax import images, metrics
from tests.helpers import read_events


def test_metrics_event_file_round_trip(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path), total_steps=10)
    w.scalars(3, {"loss": 0.5})
    w.image(3, "grid", images.signed_grid(np.zeros((3, 4, 4, 3)), cols=2))
    w.close()
    (event_file,) = os.listdir(tmp_path / "tb")
    records = read_events(str(tmp_path / "tb" / event_file))  # CRCs are checked.
    assert len(records) == 3 and b"brain.Event:2" in records[0] and b"loss" in records[1]
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 3, "loss": 0.5}'
