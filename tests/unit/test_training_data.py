"""The streamed DataModule: the encoding, the batches and the train.max_rows sample it gives from
split files in several parquet row groups, and on the real flights the gate metric the in-memory
DataModule it replaced reached."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench.inmemory import InMemoryDataModule
from bench.inmemory import split as split_in_memory
from pipelines.config import DatasetConfig, Feature, FeatureType, Label, Task
from pipelines.data import sampling
from pipelines.data.replay import month_batch
from pipelines.data.sampling import sample_positions
from pipelines.data.split import split_paths
from pipelines.evaluation.gate import metrics
from pipelines.lineage import read_json
from pipelines.training import data as training_data
from pipelines.training.data import Encoding, TabularDataModule
from pipelines.training.model import TabularModel
from pipelines.training.train import fit
from tests.conftest import make_project

ROWS, GROUP_ROWS = 1000, 100  # ten row groups a part: the shuffle buffer (4 groups) holds only some of them


def synthetic(project, rows=ROWS, seed=0):
    """A regression dataset: ``row`` (a numeric feature) numbers the rows; ``code`` is an integer
    category with a null in one row group only (pandas reads the whole column as float); ``late``
    is a category first seen in the last row group; ``x`` holds NaN and inf; ``y`` is constant;
    every 50th row has no target."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "late": np.where(np.arange(rows) >= rows - GROUP_ROWS // 2, "new", rng.choice(["a", "b", None], rows)),
            "code": pd.array(rng.integers(0, 5, rows), dtype="Int64"),
            "row": np.arange(rows, dtype="float64"),
            "x": rng.normal(1e6, 3.0, rows),  # a large mean: summing squares would cancel
            "y": np.full(rows, 2.5),
            "target": rng.normal(300.0, 40.0, rows),
        }
    )
    frame.loc[3 * GROUP_ROWS + 7, "code"] = pd.NA
    frame.loc[[5, 250], "x"] = np.nan
    frame.loc[[6, 700], "x"] = [np.inf, -np.inf]
    frame.loc[::50, "target"] = np.nan
    features = [Feature(name="late", type=FeatureType.categorical), Feature(name="code", type=FeatureType.categorical)]
    features += [Feature(name=c, type=FeatureType.numeric) for c in ("row", "x", "y")]
    dataset = project.dataset.model_copy(update={"id_column": None, "time_column": None, "label": Label(column="target", task=Task.regression), "features": tuple(features)})
    return frame, DatasetConfig.model_validate(dataset.model_dump())


def write_splits(folder, parts, group_rows=GROUP_ROWS):
    """Each part in row groups of ``group_rows``, without pandas' metadata (as the split stage writes them)."""
    paths = split_paths(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        pq.write_table(pa.Table.from_pandas(parts[name], preserve_index=False).replace_schema_metadata(None), path, row_group_size=group_rows)
    return paths


@pytest.fixture
def split(project, tmp_path):
    frame, dataset = synthetic(project)
    return write_splits(tmp_path / "split", {"train": frame, "val": frame.head(250), "test": frame.tail(250)}), dataset, frame


def module(paths, dataset, seed=13, max_rows=None, batch_size=64):
    data = TabularDataModule(paths, dataset, batch_size, seed=seed, max_rows=max_rows)
    data.setup()
    return data


def epoch(loader):
    batches = list(loader)
    return np.concatenate([b[1][:, 0].numpy() for b in batches]).astype(int), [len(b[2]) for b in batches]  # `row` of each row


def test_the_streamed_encoding_equals_fit_on_the_whole_train_frame(split):
    paths, dataset, frame = split

    streamed = module(paths, dataset).encoding
    whole = Encoding.fit(pd.read_parquet(paths["train"]).dropna(subset=["target"]), dataset)

    assert streamed.categorical == whole.categorical
    assert streamed.categorical["late"][-1] == "new" and "1.0" in streamed.categorical["code"]  # seen late; read as pandas reads the file
    assert streamed.numeric == whole.numeric
    np.testing.assert_allclose(streamed.numeric_mean, whole.numeric_mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.numeric_std, whole.numeric_std, rtol=1e-9)
    assert streamed.numeric_std[2] == whole.numeric_std[2] == 1.0  # y: no spread
    assert (streamed.target_mean, streamed.target_std) == pytest.approx((whole.target_mean, whole.target_std), rel=1e-12)


def test_each_epoch_yields_every_labelled_row_once_in_its_own_order(split):
    paths, dataset, frame = split
    labelled = frame.index[frame["target"].notna()].to_numpy()

    data = module(paths, dataset)
    loader = data.train_dataloader()
    first, sizes = epoch(loader)
    second, _ = epoch(loader)
    again, _ = epoch(module(paths, dataset).train_dataloader())

    assert sorted(first) == sorted(second) == list(labelled)
    assert sizes[:-1] == [64] * (len(sizes) - 1) and sum(sizes) == len(labelled) == len(loader) * 64 - (64 - sizes[-1])
    assert list(first) != list(second) and list(again) == list(first)
    assert len(set(first[:64] // GROUP_ROWS)) > 1  # a batch mixes row groups
    assert list(epoch(data.val_dataloader())[0]) == [r for r in labelled if r < 250]  # val: file order


def test_max_rows_trains_on_the_same_seeded_sample_every_epoch_and_run(split):
    paths, dataset, frame = split

    data = module(paths, dataset, max_rows=300)
    loader = data.train_dataloader()
    first, second = epoch(loader)[0], epoch(loader)[0]
    again = epoch(module(paths, dataset, max_rows=300).train_dataloader())[0]
    other = epoch(module(paths, dataset, seed=14, max_rows=300).train_dataloader())[0]

    assert len(first) == len(set(first)) == 300 and data.train_rows == {"split": 980, "trained": 300}
    assert set(second) == set(again) == set(first) != set(other)
    assert list(second) != list(first)
    assert frame.loc[first, "target"].notna().all()
    sampled = pd.read_parquet(paths["train"]).loc[sorted(first)]
    assert data.encoding.categorical == Encoding.fit(sampled, dataset).categorical  # the encoding is the sample's
    assert data.encoding.numeric_mean == pytest.approx(Encoding.fit(sampled, dataset).numeric_mean, rel=1e-12)
    assert module(paths, dataset, max_rows=5000).train_rows == {"split": 980, "trained": 980}


def test_sample_positions_are_distinct_sorted_and_uniform_across_blocks(monkeypatch):
    monkeypatch.setattr(sampling, "SAMPLE_BLOCK", 1000)

    drawn = [sample_positions(10_050, 3000, seed) for seed in range(40)]

    assert all(len(np.unique(d)) == 3000 and (np.diff(d) > 0).all() and d[-1] < 10_050 for d in drawn)
    assert (sample_positions(10_050, 3000, 0) == drawn[0]).all() and not (drawn[1] == drawn[0]).all()
    per_block = np.bincount(np.concatenate(drawn) // 1000) / 40  # 300 a full block expected, 15 in the last 50
    assert np.abs(per_block[:10] - 300).max() < 15 and abs(per_block[10] - 15) < 3
    assert len(sample_positions(10, 10, 0)) == 10
    with pytest.raises(ValueError, match="cannot draw 11 distinct positions out of 10"):
        sample_positions(10, 11, 0)


def test_streamed_training_on_real_flights_reaches_the_in_memory_test_roc_auc(tmp_path, monkeypatch):
    # Two real months, split as the split stage does, written in row groups of 5,000 rows (seven
    # for train: the shuffle buffer of four holds half of them), trained by fit() with each DataModule.
    config = make_project(tmp_path / "project")
    raw = pd.concat([month_batch("2013-01"), month_batch("2013-02")], ignore_index=True)
    paths = write_splits(tmp_path / "split", split_in_memory(raw, config.dataset, config.split), group_rows=5000)
    test = pd.read_parquet(paths["test"])
    settings = config.train.model_copy(update={"batch_size": 1024})  # 3 epochs of 35 batches: quick, past the gate's floor

    def roc_auc(folder):
        record = fit(settings, config.model, config.dataset, paths, folder, {"run_id": None})
        model = TabularModel.load_from_checkpoint(folder / record["checkpoint"], map_location="cpu").eval()
        encoding = Encoding(**read_json(folder / "encoding.json"))
        with torch.no_grad():
            predicted = model.predict(torch.from_numpy(encoding.categorical_indices(test)), torch.from_numpy(encoding.numeric_values(test))).numpy()
        return metrics(Task.classification, test["arr_delayed"].to_numpy(), predicted)["roc_auc"]

    class InMemory(InMemoryDataModule):  # as fit() builds its DataModule; the old one read whole splits
        def __init__(self, paths, dataset, batch_size, **_):
            super().__init__(paths, dataset, batch_size)

        train_rows = None

    streamed = roc_auc(tmp_path / "streamed")
    monkeypatch.setattr(training_data, "TabularDataModule", InMemory)
    in_memory = roc_auc(tmp_path / "in-memory")

    # The two differ only in the order rows are drawn, as two seeds do: each has a standard
    # deviation of about gate.seed_noise (0.007, flights January-March), their difference about
    # 0.007 * sqrt(2) = 0.01; 0.03 is three of those. A broken stream (misaligned labels, a wrong
    # encoding) scores near 0.5 against about 0.7.
    assert in_memory > 0.6 and streamed > 0.6
    assert abs(streamed - in_memory) < 0.03, (streamed, in_memory)
