"""Seeded samples of parquet files read a batch at a time (pipelines.data.sampling)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.sampling import positions, read_sample


def test_a_sample_is_the_rows_at_its_positions_across_row_groups_and_the_same_for_the_seed(tmp_path):
    # Given 10,000 rows in row groups of 1,000
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"row": range(10_000), "text": [f"r{i}" for i in range(10_000)]}), path, row_group_size=1_000)

    sample = read_sample(path, ["row", "text"], 700, seed=5)

    # Then it holds exactly the 700 drawn rows, in file order, whole; the seed decides which
    expected = positions(10_000, 700, 5)
    assert expected is not None and len(set(expected)) == 700
    assert sample["row"].tolist() == expected.tolist()
    assert (sample["text"] == "r" + sample["row"].astype(str)).all()
    assert read_sample(path, ["row"], 700, seed=5).equals(sample[["row"]])
    assert read_sample(path, ["row"], 700, seed=6)["row"].tolist() != expected.tolist()
    # and a file no larger than the sample is read whole
    pd.testing.assert_frame_equal(read_sample(path, ["row"], 10_000, seed=5), pd.read_parquet(path, columns=["row"]))
