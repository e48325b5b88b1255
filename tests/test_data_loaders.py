"""Real-data loaders and file resolution, on the shared copies in ../shared/data (no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlbook.data import _files
from mtlbook.data import (
    DataFileChecksumError,
    DataFileError,
    DataFileFormatError,
    DataFileNotFoundError,
    cmapss_tasks,
    load_census_income,
    load_cmapss,
)
from mtlbook.data._files import file_sha256, resolve_data_file
from mtlbook.data.census import CENSUS_COLUMNS, CENSUS_FILE, CENSUS_NUMERIC
from mtlbook.data.cmapss import CMAPSS_COLUMNS, cmapss_files

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("MTLBOOK_DATA") or REPO.parent / "shared" / "data")
CENSUS_GZ = DATA_ROOT / "census-income" / "census-income.test.gz"
CMAPSS_DIR = DATA_ROOT / "cmapss"
CMAPSS_NAMES = ("train_FD001.txt", "test_FD001.txt", "RUL_FD001.txt")


def _no_network(url, destination):
    raise OSError(f"network disabled in tests (asked for {url})")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Every test: shared data via MTLBOOK_DATA, a private cache, and no network."""
    monkeypatch.setenv("MTLBOOK_DATA", str(DATA_ROOT))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(_files, "_download", _no_network)


@pytest.fixture(scope="module")
def census():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTLBOOK_DATA", str(DATA_ROOT))
        mp.setattr(_files, "_download", _no_network)
        return load_census_income(seed=0)


@pytest.fixture(scope="module")
def cmapss():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTLBOOK_DATA", str(DATA_ROOT))
        mp.setattr(_files, "_download", _no_network)
        return load_cmapss("FD001")


def _census_lines(n: int) -> list[str]:
    lines = []
    with gzip.open(CENSUS_GZ, "rt", encoding="latin-1") as handle:
        for line in handle:
            lines.append(line.rstrip("\n"))
            if len(lines) == n:
                break
    return lines


def _write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="latin-1") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- census


def test_census_rows_splits_and_tasks(census):
    sizes = [len(census.train), len(census.val), len(census.test)]
    assert sum(sizes) == 99_762 and sizes == [69_833, 14_964, 14_965]
    rows = torch.cat([census.train.extras["row"], census.val.extras["row"], census.test.extras["row"]])
    assert torch.equal(rows.sort().values, torch.arange(99_762))  # disjoint, complete
    for split in (census.train, census.val, census.test):
        assert split.task_names == ("income", "never_married")
        assert all(s.kind == "binary" for s in split.task_specs)
        assert split.inputs.shape == (len(split), census.n_features)
        for y in split.targets.values():
            assert y.dtype == torch.float32 and set(y.unique().tolist()) <= {0.0, 1.0}
    income = torch.cat([s.targets["income"] for s in (census.train, census.val, census.test)])
    never = torch.cat([s.targets["never_married"] for s in (census.train, census.val, census.test)])
    assert int(income.sum()) == 6_186  # rows labelled "50000+."
    assert int(never.sum()) == 43_143  # rows with marital status "Never married"


def test_census_features(census):
    names = census.feature_names
    assert len(names) == census.n_features == census.train.n_features
    assert len(set(names)) == len(names)
    assert names[: len(CENSUS_NUMERIC)] == CENSUS_NUMERIC
    for banned in ("marital_status", "income", "instance_weight"):
        assert not any(n == banned or n.startswith(banned + "=") for n in names)
    assert len(CENSUS_COLUMNS) == 42 and CENSUS_COLUMNS[7] == "marital_status"
    assert CENSUS_COLUMNS[24] == "instance_weight" and CENSUS_COLUMNS[41] == "income"
    k = len(CENSUS_NUMERIC)
    train_numeric = census.train.inputs[:, :k].double()
    assert torch.allclose(train_numeric.mean(0), torch.zeros(k, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(train_numeric.std(0), torch.ones(k, dtype=torch.float64), atol=1e-3)
    onehot = census.train.inputs[:, k:]
    assert bool(((onehot == 0) | (onehot == 1)).all())
    # every train row has exactly one category per categorical column
    assert torch.all(onehot.sum(1) == len(census.categorical_features))
    assert torch.isfinite(census.test.inputs).all()
    assert census.train.extras["instance_weight"].min() > 0


def _small_census(tmp_path: Path, n: int = 400) -> Path:
    return _write_gz(tmp_path / "census-income.test.gz", _census_lines(n))


def test_census_split_is_deterministic_and_seeded(tmp_path):
    path = _small_census(tmp_path)
    a = load_census_income(path, seed=1, verify_checksum=False)
    b = load_census_income(tmp_path, seed=1, verify_checksum=False)  # a directory works too
    c = load_census_income(path, seed=2, verify_checksum=False)
    assert torch.equal(a.train.extras["row"], b.train.extras["row"])
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert not torch.equal(a.train.extras["row"], c.train.extras["row"])
    assert [len(a.train), len(a.val), len(a.test)] == [280, 60, 60]


def test_census_statistics_come_from_train_only(tmp_path):
    data = load_census_income(_small_census(tmp_path), seed=0, verify_checksum=False, log_money=False)
    rows = data.train.extras["row"]
    ages = torch.tensor([float(line.split(",")[0]) for line in _census_lines(400)], dtype=torch.float64)
    assert float(data.numeric_mean[0]) == pytest.approx(float(ages[rows].mean()), rel=1e-5)
    assert float(data.numeric_std[0]) == pytest.approx(float(ages[rows].std(unbiased=False)), rel=1e-5)
    assert float(data.numeric_mean[0]) != pytest.approx(float(ages.mean()), rel=1e-6)


def test_census_rejects_corrupt_file(tmp_path):
    copy = tmp_path / "census-income.test.gz"
    shutil.copyfile(CENSUS_GZ, copy)
    _flip_byte(copy, 1000)
    actual = hashlib.sha256(copy.read_bytes()).hexdigest()
    with pytest.raises(DataFileChecksumError) as info:
        load_census_income(copy)
    message = str(info.value)
    assert "census-income.test.gz" in message and CENSUS_FILE.sha256 in message and actual in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataFileError)


def test_census_missing_file_says_where_to_put_it(tmp_path, monkeypatch):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("MTLBOOK_DATA", str(empty))
    with pytest.raises(DataFileNotFoundError) as info:
        load_census_income()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "census-income.test.gz" in message and "network disabled" in message
    assert str(empty / "census-income" / "census-income.test.gz") in message  # where it looked
    assert str(tmp_path / "xdg-cache" / "mtlbook" / "census-income") in message  # the cache
    assert "MTLBOOK_DATA" in message and "path=" in message


def test_download_false_never_touches_the_network(tmp_path, monkeypatch):
    monkeypatch.delenv("MTLBOOK_DATA")

    def forbidden(url, destination):
        raise AssertionError("download attempted")

    monkeypatch.setattr(_files, "_download", forbidden)
    with pytest.raises(DataFileNotFoundError, match="download=False"):
        load_census_income(download=False)


def test_explicit_path_that_lacks_the_file(tmp_path):
    with pytest.raises(DataFileNotFoundError) as info:
        load_census_income(tmp_path)
    assert str(tmp_path / "census-income.test.gz") in str(info.value)


@pytest.mark.parametrize(
    "line_no, edit, words",
    [
        (5, lambda f: f[:-1], ["line 5", "42 comma-separated fields", "found 41"]),
        (3, lambda f: ["abc"] + f[1:], ["line 3", "age", "'abc'"]),
        (7, lambda f: f[:-1] + [" maybe."], ["line 7", "income label"]),
    ],
)
def test_census_malformed_row_names_file_and_line(tmp_path, line_no, edit, words):
    lines = _census_lines(40)
    lines[line_no - 1] = ",".join(edit(lines[line_no - 1].split(",")))
    path = _write_gz(tmp_path / "broken.csv.gz", lines)
    with pytest.raises(DataFileFormatError) as info:
        load_census_income(path, verify_checksum=False)
    message = str(info.value)
    assert "broken.csv.gz" in message
    for word in words:
        assert word in message


def test_census_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="fractions"):
        load_census_income(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(TypeError, match="seed"):
        load_census_income(seed="0")


# --------------------------------------------------------------------------- file resolution


def test_mocked_download_lands_verified_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MTLBOOK_DATA")
    calls = []

    def fake(url, destination):
        calls.append(url)
        shutil.copyfile(CENSUS_GZ, destination)

    monkeypatch.setattr(_files, "_download", fake)
    path = resolve_data_file(CENSUS_FILE)
    assert path == tmp_path / "xdg-cache" / "mtlbook" / "census-income" / "census-income.test.gz"
    assert calls == [CENSUS_FILE.url] and file_sha256(path) == CENSUS_FILE.sha256
    assert resolve_data_file(CENSUS_FILE) == path and len(calls) == 1  # the cache answers now
    assert sorted(p.name for p in path.parent.iterdir()) == ["census-income.test.gz"]  # no leftovers


def test_corrupt_download_is_rejected_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("MTLBOOK_DATA")
    monkeypatch.setattr(_files, "_download", lambda url, dest: Path(dest).write_bytes(b"not the file"))
    with pytest.raises(DataFileChecksumError, match="census-income.test.gz"):
        resolve_data_file(CENSUS_FILE)
    folder = tmp_path / "xdg-cache" / "mtlbook" / "census-income"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_hash_is_computed_once_per_file(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("hello")
    counted = []
    real = _files._hash_file
    monkeypatch.setattr(_files, "_hash_file", lambda p: counted.append(p) or real(p))
    first = file_sha256(target)
    assert file_sha256(target) == first == hashlib.sha256(b"hello").hexdigest()
    assert len(counted) == 1
    os.utime(target, ns=(1, 1))  # a changed file is hashed again
    file_sha256(target)
    assert len(counted) == 2


# --------------------------------------------------------------------------- C-MAPSS


def test_cmapss_frames(cmapss):
    train, test = cmapss.train, cmapss.test
    assert list(train.columns) == list(CMAPSS_COLUMNS) + ["rul"] == list(test.columns)
    assert len(CMAPSS_COLUMNS) == 26
    assert len(train) == 20_631 and train["unit"].nunique() == 100
    assert len(test) == 13_096 and test["unit"].nunique() == 100
    assert len(cmapss.final_rul) == 100 and list(cmapss.final_rul.index) == list(range(1, 101))
    # train: rul = max cycle of the unit - cycle, so each unit ends at 0 and counts down by 1
    last = train.groupby("unit").tail(1)
    assert (last["rul"] == 0).all()
    assert (train["rul"] == train.groupby("unit")["cycle"].transform("max") - train["cycle"]).all()
    assert (train.groupby("unit")["rul"].diff().dropna() == -1).all()
    # test: the last cycle of each unit carries the RUL file's value
    test_last = test.groupby("unit").tail(1).set_index("unit")["rul"]
    assert (test_last == cmapss.final_rul).all()
    unit1 = test[test["unit"] == 1]
    assert int(unit1["rul"].iloc[0]) == int(cmapss.final_rul.loc[1]) + len(unit1) - 1
    assert train["unit"].dtype == np.int64 and train["rul"].dtype == np.int64


def test_cmapss_rul_cap():
    capped = load_cmapss(rul_cap=125)
    assert int(capped.train["rul"].max()) == 125 and int(capped.test["rul"].max()) <= 125
    with pytest.raises(ValueError, match="rul_cap"):
        load_cmapss(rul_cap=0)


def test_cmapss_tasks(cmapss):
    tasks = cmapss_tasks(cmapss, horizon=30)
    assert tasks.train.task_names == ("rul", "fails_soon")
    assert tasks.train.inputs.shape == (20_631, len(tasks.feature_names))
    assert tasks.test.inputs.shape == (13_096, len(tasks.feature_names))
    assert "s_1" not in tasks.feature_names and "s_2" in tasks.feature_names  # constant dropped
    x = tasks.train.inputs.double()
    assert torch.allclose(x.mean(0), torch.zeros(x.shape[1], dtype=torch.float64), atol=1e-4)
    rul, soon = tasks.train.targets["rul"], tasks.train.targets["fails_soon"]
    assert torch.equal(soon, (rul <= 30).float())
    assert torch.equal(tasks.train.extras["unit"].unique(), torch.arange(1, 101))
    with pytest.raises(ValueError, match="horizon"):
        cmapss_tasks(cmapss, horizon=0)


def _copy_cmapss(tmp_path: Path) -> Path:
    folder = tmp_path / "cm"
    folder.mkdir()
    for name in CMAPSS_NAMES:
        shutil.copyfile(CMAPSS_DIR / name, folder / name)
    return folder


def test_cmapss_rejects_corrupt_file(tmp_path):
    folder = _copy_cmapss(tmp_path)
    _flip_byte(folder / "RUL_FD001.txt", 3)
    with pytest.raises(DataFileChecksumError) as info:
        load_cmapss(path=folder)
    message = str(info.value)
    assert "RUL_FD001.txt" in message and cmapss_files()["rul"].sha256 in message


def test_cmapss_malformed_row_names_file_and_line(tmp_path):
    folder = _copy_cmapss(tmp_path)
    train = folder / "train_FD001.txt"
    lines = train.read_text().splitlines()
    lines[2] = " ".join(lines[2].split()[:-1])  # 25 numbers on line 3
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileFormatError) as info:
        load_cmapss(path=folder, verify_checksum=False)
    assert "train_FD001.txt" in str(info.value) and "line 3" in str(info.value)
    lines[2] = "1 3 x" + " 0" * 23
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileFormatError, match="line 3"):
        load_cmapss(path=folder, verify_checksum=False)


def test_cmapss_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBOOK_DATA", str(tmp_path / "nothing-here"))
    with pytest.raises(DataFileNotFoundError) as info:
        load_cmapss()
    assert "train_FD001.txt" in str(info.value) and "cmapss" in str(info.value)
    with pytest.raises(ValueError, match="subset"):
        load_cmapss("FD009")


def test_cmapss_download_opens_nested_zip_once(tmp_path, monkeypatch):
    monkeypatch.delenv("MTLBOOK_DATA")
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        for name in CMAPSS_NAMES:
            archive.write(CMAPSS_DIR / name, f"CMAPSSData/{name}")
    calls = []

    def fake(url, destination):
        calls.append(url)
        with zipfile.ZipFile(destination, "w") as outer:
            outer.writestr("6. Turbofan Engine Degradation Simulation Data Set/CMAPSSData.zip", inner.getvalue())

    monkeypatch.setattr(_files, "_download", fake)
    data = load_cmapss()
    assert len(data.train) == 20_631 and len(calls) == 1  # three files, one download
    cached = tmp_path / "xdg-cache" / "mtlbook" / "cmapss"
    for name in CMAPSS_NAMES:
        assert file_sha256(cached / name) == file_sha256(CMAPSS_DIR / name)


def test_cmapss_refuses_negative_rul_and_duplicate_rows(tmp_path):
    folder = _copy_cmapss(tmp_path)
    rul = folder / "RUL_FD001.txt"
    values = rul.read_text().splitlines()
    values[4] = "-5"
    rul.write_text("\n".join(values) + "\n")
    with pytest.raises(DataFileFormatError, match=r"RUL_FD001.txt, line 5: RUL must be a whole number of cycles >= 0"):
        load_cmapss(path=folder, verify_checksum=False)
    (tmp_path / "again").mkdir()
    folder = _copy_cmapss(tmp_path / "again")
    train = folder / "train_FD001.txt"
    lines = train.read_text().splitlines()
    lines.insert(3, lines[2])  # unit 1, cycle 3 twice
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileFormatError, match=r"train_FD001.txt: 1 duplicate \(unit, cycle\) row\(s\), first unit 1 cycle 3"):
        load_cmapss(path=folder, verify_checksum=False)
