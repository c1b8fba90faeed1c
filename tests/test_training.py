"""Training and evaluation end to end on a tiny synthetic HAM10000, in both folder layouts.

The original layout: HAM10000_metadata.csv + HAM10000_images_train/ + HAM10000_images_test/ (a lesion's images
all on one side). The public-download layout: the metadata plus images in arbitrary folders, no test folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from skinlesion.image import decode_image
from skinlesion.model import CLASS_CODES, CLASS_NAMES
from skinlesion.predictor import Predictor
from tests.conftest import ROOT
from training import train as training_main
from training.ablation import format_table
from training.ablation import main as ablation_main
from training.calibrate import calibrate_checkpoint
from training.calibrate import main as calibrate_main
from training.compare_calibrators import CALIBRATORS, SHIPPED_CALIBRATOR, shipped_resplit
from training.data import TEST_FOLDER, TRAIN_FOLDER, grouped_split, read_samples, split_dataset
from training.evaluate import (
    calibration_error_floor,
    compute_metrics,
    expected_calibration_error,
    malignant_calibration_error,
    predict_samples,
)
from training.evaluate import main as evaluate_main
from training.model_card import main as model_card_main
from training.model_card import render
from training.train import parse_args, train

COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
IMAGES_PER_LESION = (2, 1, 3, 1, 2)  # five lesions per class, 9 images per class, 63 in all
LAYOUTS = ("original", "download")
DOWNLOAD_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images_part_2/more")
# The calibrators compared over 10 resplits and 1 out-of-fold deal (a real run: 200 and 20; what ships is fitted
# the same): report figures no test reads closely, at a twentieth of the fitting time.
BRIEF_COMPARISON_DRAWS = (10, 1)
BRIEF_COMPARISON = ["--comparison-draws", *map(str, BRIEF_COMPARISON_DRAWS)]
FAST = ["--type", "resnet18", "--image-size", "32", "48", "--batch-size", "8", "--workers", "0", "--no-amp",
        "--device", "cpu", "--seed", "0", *BRIEF_COMPARISON]


# Tiny data sets make scikit-learn note what it would warn about on real ones; nothing here depends on it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The least populated class in y has only:UserWarning"),
    pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Train on one thread: beside a busy training job two threads wait on each other (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_dataset(root: Path, layout: str) -> list[dict[str, str]]:
    """Small random 40x30 JPEGs (tinted by class) and their metadata; returns the metadata rows."""
    rng = np.random.default_rng(0)
    rows, n = [], 0
    for k, code in enumerate(CLASS_CODES):
        for j, count in enumerate(IMAGES_PER_LESION):
            lesion = f"HAM_{k * 10 + j:07d}"
            # original layout: each class's first lesion (2 images) goes to the test folder, the rest to train
            folder = (TEST_FOLDER if j == 0 else TRAIN_FOLDER) if layout == "original" else None
            for _ in range(count):
                image_id = f"ISIC_{n:07d}"
                target = root / (folder or DOWNLOAD_FOLDERS[n % len(DOWNLOAD_FOLDERS)])
                target.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (30, 40, 3)) * 0.5 + np.array([k * 18, 255 - k * 30, 60]) * 0.5
                Image.fromarray(pixels.astype(np.uint8), "RGB").save(target / f"{image_id}.jpg", quality=90)
                rows.append(dict(zip(COLUMNS, (lesion, image_id, code, "histo", "45.0", "female", "back"), strict=True)))
                n += 1
    write_metadata(root, rows)
    return rows


def write_metadata(root: Path, rows: list[dict[str, str]]) -> None:
    with (root / "HAM10000_metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def lesions(samples) -> set[str]:
    return {s.lesion_id for s in samples}


@dataclass
class Trained:
    root: Path
    weights: Path
    run_dir: Path
    report: dict


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Two epochs, uninterrupted, on the original layout; everything written inside the temporary folder."""
    base = tmp_path_factory.mktemp("trained")
    write_dataset(base / "ham", "original")
    weights = base / "out" / "resnet18.pt"
    argv = [str(base / "ham"), *FAST, "--epochs", "2", "--modelname", str(weights), "--checkpoint-dir", str(base / "runs")]
    report = train(parse_args(argv))
    return Trained(base / "ham", weights, base / "runs" / "resnet18", report)


# ---------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_samples_finds_every_image_in_either_layout(tmp_path: Path, layout: str) -> None:
    rows = write_dataset(tmp_path, layout)
    samples = read_samples(tmp_path)
    assert [s.image_id for s in samples] == [r["image_id"] for r in rows]
    assert [CLASS_CODES[s.label] for s in samples] == [r["dx"] for r in rows]
    assert all(s.path.is_file() and s.path.stem == s.image_id for s in samples)
    if layout == "download":  # found in every folder beneath, however deep
        assert {s.path.parent.relative_to(tmp_path).as_posix() for s in samples} == set(DOWNLOAD_FOLDERS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_never_puts_a_lesion_on_two_sides(tmp_path: Path, layout: str) -> None:
    rows = write_dataset(tmp_path, layout)
    train_set, val_set, test_set = split_dataset(tmp_path, seed=0)
    sides = [train_set, val_set, test_set]
    assert all(sides), "every side gets some images"
    ids = [s.image_id for side in sides for s in side]
    assert sorted(ids) == sorted(r["image_id"] for r in rows)  # every sample on exactly one side
    assert not lesions(train_set) & lesions(val_set)
    assert not lesions(train_set) & lesions(test_set)
    assert not lesions(val_set) & lesions(test_set)
    if layout == "original":  # the test side is exactly the test folder
        assert {s.image_id for s in test_set} == {p.stem for p in (tmp_path / TEST_FOLDER).iterdir()}
    assert split_dataset(tmp_path, seed=0) == (train_set, val_set, test_set)  # reproducible
    # Training on the test split too leaves the validation split as it was.
    assert split_dataset(tmp_path, seed=0, train_on_test=True) == (train_set + test_set, val_set, [])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fraction", [0.15, 0.2, 0.5])
def test_grouped_split_keeps_lesions_whole(tmp_path: Path, layout: str, fraction: float) -> None:
    write_dataset(tmp_path, layout)
    samples = read_samples(tmp_path)
    keep, held = grouped_split(samples, fraction, seed=3)
    assert keep and held
    assert sorted(s.image_id for s in keep + held) == sorted(s.image_id for s in samples)
    assert not lesions(keep) & lesions(held)
    # multi-image lesions really are kept together, not just absent from one side
    by_lesion = {}
    for s in samples:
        by_lesion.setdefault(s.lesion_id, set()).add(s.image_id)
    held_ids = {s.image_id for s in held}
    assert all(ids <= held_ids or not ids & held_ids for ids in by_lesion.values())
    assert 0.5 * fraction <= len(held) / len(samples) <= 2 * fraction


def test_lesion_in_both_train_and_test_folders_is_an_error(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path, "original")
    lesion = rows[0]["lesion_id"]  # two images, both in the test folder: move one to train
    moved = [r["image_id"] for r in rows if r["lesion_id"] == lesion][1]
    shutil.move(tmp_path / TEST_FOLDER / f"{moved}.jpg", tmp_path / TRAIN_FOLDER / f"{moved}.jpg")
    with pytest.raises(ValueError, match="1 lesion.* both sides"):
        split_dataset(tmp_path, seed=0)


# ------------------------------------------------------------------------------------ clear errors


def fast_args(root: Path, tmp_path: Path, *extra: str):
    return parse_args([str(root), *FAST, "--epochs", "1", "--modelname", str(tmp_path / "out" / "resnet18.pt"),
                       "--checkpoint-dir", str(tmp_path / "runs"), *extra])


def test_missing_metadata_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path / "ham", "download")
    (tmp_path / "ham" / "HAM10000_metadata.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"no metadata file in .*ham: expected one of HAM10000_metadata\.csv"):
        train(fast_args(tmp_path / "ham", tmp_path))
    assert not (tmp_path / "out").exists()
    assert evaluate_main([str(tmp_path / "ham"), "--type", "resnet18", "--weights", str(tmp_path / "none.pt")]) == 2
    assert "error: no metadata file in" in capsys.readouterr().err


def test_listed_but_absent_image_is_a_clear_error(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path / "ham", "original")
    gone = rows[20]["image_id"]
    next((tmp_path / "ham").rglob(f"{gone}.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 image\(s\) listed in .*HAM10000_metadata\.csv are not under .*: {gone}$"):
        train(fast_args(tmp_path / "ham", tmp_path))
    assert not (tmp_path / "out").exists()


def test_many_absent_images_are_listed_briefly(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path, "download")
    for row in rows[:7]:
        next(tmp_path.rglob(f"{row['image_id']}.jpg")).unlink()
    with pytest.raises(FileNotFoundError) as info:
        read_samples(tmp_path)
    message = str(info.value)
    assert message.startswith("7 image(s) listed in") and message.endswith(" ...")
    assert all(r["image_id"] in message for r in rows[:5]) and rows[6]["image_id"] not in message


def test_unknown_class_code_names_the_code_and_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = write_dataset(tmp_path / "ham", "original")
    rows[10]["dx"] = "melanoma"  # data row 11 is line 12 of the file (after the header)
    write_metadata(tmp_path / "ham", rows)
    with pytest.raises(ValueError, match=r"HAM10000_metadata\.csv, line 12: unknown class code 'melanoma' \(known: akiec, bcc"):
        train(fast_args(tmp_path / "ham", tmp_path))
    assert evaluate_main([str(tmp_path / "ham"), "--type", "resnet18", "--weights", str(tmp_path / "none.pt")]) == 2
    assert "line 12: unknown class code 'melanoma'" in capsys.readouterr().err


def test_missing_metadata_column_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text("lesion_id,image,dx\nHAM_1,ISIC_1,mel\n")
    with pytest.raises(ValueError, match=r"metadata\.csv: missing column\(s\) image_id"):
        read_samples(tmp_path)


# ----------------------------------------------------------------------------------------- training


def test_training_writes_weights_the_predictor_serves(trained: Trained) -> None:
    predictor = Predictor.from_checkpoint(trained.weights)
    assert predictor.arch == "resnet18" and predictor.image_size == (32, 48)
    image = decode_image(next((trained.root / TEST_FOLDER).iterdir()).read_bytes())
    [result] = predictor.predict([image])
    assert list(result["probabilities"]) == list(CLASS_NAMES)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in result["probabilities"].values())
    assert result["prediction"] == max(result["probabilities"], key=result["probabilities"].get)
    # Training ends by calibrating the checkpoint it saved.
    assert predictor.calibration is not None and predictor.card["test_images"] == 2 * len(CLASS_CODES)
    assert isinstance(result["in_domain"], bool) and isinstance(result["malignancy_alert"], bool)


def test_calibrate_cli_refits_a_checkpoint_and_updates_its_report(trained: Trained, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    weights, report = tmp_path / "copy.pt", tmp_path / "copy.json"
    shutil.copy(trained.weights, weights)
    shutil.copy(trained.weights.with_suffix(".json"), report)
    assert calibrate_main([str(trained.root), "--type", "resnet18", "--weights", str(weights), *BRIEF_COMPARISON]) == 0
    printed = capsys.readouterr().out
    assert "temperatures by predicted class" in printed and "out-of-domain set" in printed and f"wrote {report}" in printed
    saved = json.loads(report.read_text())
    fitted = Predictor.from_checkpoint(weights).calibration
    assert tuple(saved["calibration"]["temperatures"].values()) == pytest.approx(fitted.temperatures)
    assert saved["history"] == trained.report["history"]  # the rest of the training report is kept
    assert set(saved["calibration"]["out_of_domain"]["selection_set"]["candidates"]) >= {"energy", "max logit"}
    out_of_fold = saved["calibration"]["validation_out_of_fold"]
    resplits, deals = BRIEF_COMPARISON_DRAWS
    assert out_of_fold["deals"] == deals and shipped_resplit(saved["calibration"])["draws"] == resplits
    assert f"{deals} deals)" in printed and f"test ECE over {resplits} lesion-grouped resplits" in printed
    assert 0 <= out_of_fold["ece"] <= 1 and out_of_fold["ece_if_calibrated"]["mean"] <= out_of_fold["ece_if_calibrated"]["p95"]
    assert set(saved["calibration"]["validation_out_of_fold_alternatives"]) == set(list(CALIBRATORS)[1:])
    assert "out of fold" in printed and "perfectly calibrated" in printed
    assert f"{SHIPPED_CALIBRATOR} (shipped)" in printed
    assert calibrate_main([str(trained.root), "--type", "resnet18", "--weights", str(tmp_path / "absent.pt")]) == 2


def test_weights_trained_on_the_test_split_carry_the_test_figures_of_the_run_that_held_it_out(
        trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = fast_args(trained.root, tmp_path, "--train-on-test")
    report = train(args)
    n_test = len(list((trained.root / TEST_FOLDER).iterdir()))
    assert report["images"]["test"] == 0
    assert report["images"]["train"] == trained.report["images"]["train"] + n_test
    assert report["images"]["validation"] == trained.report["images"]["validation"]
    assert "test" not in report and "calibration" not in report  # nothing scored on images it trained on
    assert Path(f"{args.modelname.with_suffix('')}_curves.png").is_file()
    assert not Path(f"{args.modelname.with_suffix('')}_confusion.png").exists()

    held_out = trained.weights.with_suffix(".json")
    weights = ["--type", "resnet18", "--weights", str(args.modelname), *BRIEF_COMPARISON]
    assert calibrate_main([str(trained.root), *weights, "--held-out", str(held_out)]) == 0
    printed = capsys.readouterr().out
    assert "test ECE" not in printed and "no test figures" in printed
    saved = json.loads(args.modelname.with_suffix(".json").read_text())
    held_out_report = json.loads(held_out.read_text())
    assert "test" not in saved and saved["held_out_run"]["test"] == held_out_report["test"]
    assert saved["held_out_run"]["calibration"] == held_out_report["calibration"]
    predictor = Predictor.from_checkpoint(args.modelname)
    assert predictor.calibration.temperatures == pytest.approx(tuple(saved["calibration"]["temperatures"].values()))
    assert predictor.card["from_held_out_run"] is True
    assert predictor.card["accuracy"] == pytest.approx(held_out_report["test"]["accuracy"])
    assert predictor.model_card()["test_metrics"]["from_held_out_run"] is True

    # A later refit finds the held-out run in the weights' own report.
    assert calibrate_main([str(trained.root), *weights]) == 0
    assert json.loads(args.modelname.with_suffix(".json").read_text())["held_out_run"] == saved["held_out_run"]
    card = render({"resnet18": json.loads(args.modelname.with_suffix(".json").read_text())})
    assert "Trained on the test split too: resnet18" in card
    assert f"| accuracy | {held_out_report['test']['accuracy']:.3f} |" in card

    # The held-out run must have test figures of its own, and a test split is either scored or carried.
    train_set, val_set, test_set = split_dataset(trained.root, seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_checkpoint(args.modelname, train_set, val_set, test_set, held_out_run=held_out_report)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_checkpoint(args.modelname, train_set + test_set, val_set, [])
    assert calibrate_main([str(trained.root), *weights, "--held-out", str(args.modelname.with_suffix(".json"))]) == 2
    assert "has no test figures" in capsys.readouterr().err


def test_model_card_cli_needs_calibrated_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "resnet18.json").write_text(json.dumps({"model": "resnet18"}))
    assert model_card_main(["--store", str(tmp_path), "--out", str(tmp_path / "card.md")]) == 2
    assert "run python -m training.calibrate first" in capsys.readouterr().err
    assert not (tmp_path / "card.md").exists()


def test_training_writes_report_and_figures_beside_the_weights(trained: Trained) -> None:
    stem = trained.weights.with_suffix("")
    saved = json.loads(Path(f"{stem}.json").read_text())
    assert saved["model"] == "resnet18" and saved["weights"] == str(trained.weights)
    n_test = len(list((trained.root / TEST_FOLDER).iterdir()))
    assert n_test == 2 * len(CLASS_CODES)
    assert saved["images"]["test"] == n_test
    assert sum(saved["images"].values()) == sum(IMAGES_PER_LESION) * len(CLASS_CODES) == 63
    assert [row["epoch"] for row in saved["history"]] == [1, 2]
    validation = {"val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_auc", "val_melanoma_auc"}
    # By default the moving average is validated and saved, with the raw weights' figures beside it.
    assert set(saved["history"][0]) == {"epoch", "loss", "accuracy", *validation, *(f"raw_{k}" for k in validation)}
    assert saved["saved_epoch"] == saved["history"][-1]
    test = saved["test"]
    assert test["n_images"] == n_test and np.array(test["confusion_matrix"]).sum() == n_test
    assert [c["support"] for c in test["per_class"].values()] == [2] * len(CLASS_CODES)
    assert saved["arguments"]["image_size"] == [32, 48] and saved["arguments"]["epochs"] == 2
    for suffix in ("_confusion.png", "_curves.png"):
        with Image.open(f"{stem}{suffix}") as figure:
            assert figure.format == "PNG" and figure.width > 200 and figure.height > 200
    # nothing was written outside the temporary folder: the run's checkpoint sits in --checkpoint-dir
    assert (trained.run_dir / "last.pt").is_file()


def test_report_test_metrics_match_the_saved_weights(trained: Trained) -> None:
    """The report's test numbers are the saved weights' on the test folder, scored as the server would."""
    _, _, test_set = split_dataset(trained.root, seed=0)
    probs = predict_samples(Predictor.from_checkpoint(trained.weights), test_set)
    expected = compute_metrics(np.array([s.label for s in test_set]), probs)
    assert trained.report["test"]["confusion_matrix"] == expected["confusion_matrix"]
    assert trained.report["test"]["accuracy"] == pytest.approx(expected["accuracy"])


@pytest.mark.slow  # tens of seconds: ./test.sh quick leaves it out
def test_one_epoch_on_the_download_layout(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path / "ham", "download")
    report = train(fast_args(tmp_path / "ham", tmp_path))
    weights = tmp_path / "out" / "resnet18.pt"
    assert [row["epoch"] for row in report["history"]] == [1]
    assert sum(report["images"].values()) == len(rows)
    assert report["test"]["n_images"] == report["images"]["test"] > 0
    for name in ("resnet18.pt", "resnet18.json", "resnet18_confusion.png", "resnet18_curves.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    probs = Predictor.from_checkpoint(weights).probabilities(torch.zeros(3, 3, 32, 48))
    assert probs.shape == (3, len(CLASS_CODES)) and torch.allclose(probs.sum(1), torch.ones(3))


def test_resume_continues_after_an_interruption(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Interrupt epoch 2 of 2 after epoch 1's checkpoint; --resume finishes exactly as the uninterrupted run did."""
    evaluate, calls = training_main.evaluate, []

    def interrupted_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # each epoch validates the moving average, then the raw weights
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training_main, "evaluate", interrupted_in_epoch_two)
    argv = [str(trained.root), *FAST, "--epochs", "2", "--modelname", str(tmp_path / "out" / "resnet18.pt"),
            "--checkpoint-dir", str(tmp_path / "runs")]
    with pytest.raises(KeyboardInterrupt):
        train(parse_args(argv))
    saved = torch.load(tmp_path / "runs" / "resnet18" / "last.pt", weights_only=False)
    assert saved["state"]["epoch"] == 1 and len(saved["state"]["history"]) == 1
    assert not (tmp_path / "out" / "resnet18.json").exists()

    monkeypatch.setattr(training_main, "evaluate", evaluate)
    capsys.readouterr()
    report = train(parse_args([*argv, "--resume"]))
    output = capsys.readouterr().out
    assert f"resumed after epoch 1 from {tmp_path / 'runs' / 'resnet18' / 'last.pt'}" in output
    assert "epoch   2/2" in output and "epoch   1/2" not in output  # only the missing epoch is trained
    assert [row["epoch"] for row in report["history"]] == [1, 2]
    assert torch.load(tmp_path / "runs" / "resnet18" / "last.pt", weights_only=False)["state"]["epoch"] == 2
    # model, optimizer, schedule and random state all came back: the same numbers as without the interruption
    for resumed, uninterrupted in zip(report["history"], trained.report["history"], strict=True):
        assert resumed == pytest.approx(uninterrupted, rel=1e-4, abs=1e-5)
    assert report["test"]["confusion_matrix"] == trained.report["test"]["confusion_matrix"]

    capsys.readouterr()  # resuming a finished run trains nothing more
    again = train(parse_args([*argv, "--resume"]))
    output = capsys.readouterr().out
    assert "resumed after epoch 2" in output and "epoch   2/2" not in output
    assert again["history"] == report["history"]


@pytest.mark.slow  # tens of seconds: ./test.sh quick leaves it out
def test_a_run_stopped_while_saving_an_epoch_resumes_from_the_one_before(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset(tmp_path / "ham", "download")
    save = torch.save

    def stopped_while_saving_epoch_two(obj: object, path: Path, *args: object, **kwargs: object) -> None:
        if isinstance(obj, dict) and obj.get("state", {}).get("epoch") == 2:
            Path(path).write_bytes(b"the first half of a checkpoint")
            raise KeyboardInterrupt
        save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", stopped_while_saving_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(fast_args(tmp_path / "ham", tmp_path, "--epochs", "2"))
    monkeypatch.setattr(torch, "save", save)
    assert torch.load(tmp_path / "runs" / "resnet18" / "last.pt", weights_only=False)["state"]["epoch"] == 1
    report = train(fast_args(tmp_path / "ham", tmp_path, "--epochs", "2", "--resume"))
    assert [row["epoch"] for row in report["history"]] == [1, 2]


def test_flags_are_hyphenated_and_the_original_spellings_still_work() -> None:
    for spelling in (["--model-name", "m.pt", "--fine-tune"], ["--modelname", "m.pt", "--fine_tune"]):
        args = parse_args(["root", *spelling])
        assert args.modelname == Path("m.pt") and args.fine_tune is True


def test_a_run_without_its_own_test_figures_does_not_write_over_the_shipped_weights() -> None:
    assert parse_args(["root", "--type", "resnet18"]).modelname == Path("model_store/resnet18.pt")
    for flag in ("--validation-only", "--train-on-test"):
        assert parse_args(["root", "--type", "resnet18", flag]).modelname == Path("runs/resnet18.pt")


def test_bfloat16_autocast_defaults_to_where_the_device_computes_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    # Emulated bfloat16 made a training epoch 16x slower than float32 on an AVX2-only CPU.
    for native in (True, False):
        monkeypatch.setattr(training_main, "native_bfloat16", lambda device, native=native: native and device == "cpu")
        assert parse_args(["root", "--device", "cpu"]).amp is native
        assert parse_args(["root", "--device", "cpu", "--amp"]).amp is True
        assert parse_args(["root", "--device", "cpu", "--no-amp"]).amp is False


@pytest.mark.slow  # tens of seconds: ./test.sh quick leaves it out
def test_recipe_levers_train_and_the_moving_average_is_what_is_saved(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ham", "download")
    report = train(fast_args(tmp_path / "ham", tmp_path, "--rotation", "180", "--loss", "logit-adjusted", "--ema", "0.9",
                             "--mixup", "0.4", "--cutmix", "1.0"))
    assert report["arguments"]["loss"] == "logit-adjusted" and report["arguments"]["ema"] == 0.9
    last = torch.load(tmp_path / "runs" / "resnet18" / "last.pt", weights_only=False)
    saved = torch.load(tmp_path / "out" / "resnet18.pt", weights_only=True)["state_dict"]
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert set(averaged) == set(saved)
    assert all(torch.allclose(saved[k].float(), averaged[k].float(), atol=1e-2) for k in saved if saved[k].is_floating_point())
    assert not torch.allclose(saved["fc.weight"].float(), last["model"]["fc.weight"].float(), atol=1e-3)


@pytest.mark.parametrize(("select", "saved_epoch"), [("best", 1), ("final", 2)])
@pytest.mark.slow  # tens of seconds: ./test.sh quick leaves it out
def test_select_saves_the_best_validated_or_the_last_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            select: str, saved_epoch: int) -> None:
    write_dataset(tmp_path / "ham", "download")
    validate, scores = training_main.evaluate, iter([0.9, 0.1])

    def worse_every_epoch(*args: object, **kwargs: object) -> dict:
        return {**validate(*args, **kwargs), "val_balanced_accuracy": next(scores)}

    monkeypatch.setattr(training_main, "evaluate", worse_every_epoch)
    report = train(fast_args(tmp_path / "ham", tmp_path, "--epochs", "2", "--select", select, "--ema", "0"))
    assert [r["val_balanced_accuracy"] for r in report["history"]] == [0.9, 0.1]
    assert report["saved_epoch"]["epoch"] == saved_epoch and report["arguments"]["select"] == select
    last = torch.load(tmp_path / "runs" / "resnet18" / "last.pt", weights_only=False)["model"]
    saved = torch.load(tmp_path / "out" / "resnet18.pt", weights_only=True)["state_dict"]
    same = all(torch.equal(saved[k], last[k].half() if last[k].is_floating_point() else last[k]) for k in saved)
    assert same == (select == "final")  # last.pt holds epoch 2


def test_mixup_and_cutmix_each_alone_or_one_of_the_two_per_batch() -> None:
    def mixing(*flags: str):
        return training_main.build_mixing(parse_args(["root", *flags]))

    assert mixing() is None
    assert isinstance(mixing("--mixup", "0.2"), v2.MixUp) and isinstance(mixing("--cutmix", "1"), v2.CutMix)
    both = mixing("--mixup", "0.2", "--cutmix", "1")
    assert isinstance(both, v2.RandomChoice) and [type(t) for t in both.transforms] == [v2.MixUp, v2.CutMix]


def test_distillation_loss_is_zero_at_the_teachers_average_and_pulls_towards_it() -> None:
    teachers = [torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, -1.0]])]
    temperature = 2.0
    average = torch.stack([(t / temperature).softmax(1) for t in teachers]).mean(0)
    # Logits whose softened probabilities are exactly the teachers' average.
    matching = average.log() * temperature
    assert training_main.distillation_loss(matching, teachers, temperature).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(1, 3, requires_grad=True)
    loss = training_main.distillation_loss(student, teachers, temperature)
    loss.backward()
    assert loss.item() > 0
    # A gradient step raises the classes the teachers favour over the uniform student's 1/3.
    assert torch.equal((-student.grad).sign(), (average - 1 / 3).sign())


def test_a_student_trains_against_teachers_on_their_validation_split(trained: Trained, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    split_seeds = []

    def recording_split(root: Path, seed: int, **kwargs: bool):
        split_seeds.append(seed)
        return split_dataset(root, seed, **kwargs)

    monkeypatch.setattr(training_main, "split_dataset", recording_split)
    teachers = [str(trained.weights), str(trained.weights)]
    report = train(fast_args(trained.root, tmp_path, "--seed", "1", "--split-seed", "0", "--teacher", *teachers))
    assert split_seeds == [0]
    assert report["arguments"]["teacher"] == teachers and report["arguments"]["distill_weight"] == 0.5
    assert Predictor.from_checkpoint(tmp_path / "out" / "resnet18.pt").calibration is not None
    assert parse_args(["root", "--seed", "3"]).split_seed == 3


def test_a_teacher_with_other_preprocessing_is_a_clear_error(trained: Trained, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = fast_args(trained.root, tmp_path, "--image-size", "40", "48", "--teacher", str(trained.weights))
    with pytest.raises(SystemExit, match=r"teacher .*resnet18\.pt was trained at \(32, 48\) with colour constancy 0\.0, "
                       r"this run uses \(40, 48\)"):
        train(args)


@pytest.mark.slow  # tens of seconds: ./test.sh quick leaves it out
def test_colour_constancy_is_stored_and_served(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ham", "download")
    train(fast_args(tmp_path / "ham", tmp_path, "--colour-constancy", "6"))
    predictor = Predictor.from_checkpoint(tmp_path / "out" / "resnet18.pt")
    image = decode_image(next((tmp_path / "ham").rglob("*.jpg")).read_bytes())
    assert predictor.colour_constancy == 6.0
    assert not torch.equal(predictor.preprocess(image), Predictor(predictor.model, "resnet18", (32, 48)).preprocess(image))


@pytest.mark.slow  # tens of seconds: ./test.sh quick leaves it out
def test_ablation_trains_each_lever_once_and_never_reads_the_test_split(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path / "ham", "download")
    argv = [str(tmp_path / "ham"), "--epochs", "1", "--seeds", "0", "--levers", "ema", "tta-flips", "--out",
            str(tmp_path / "ablation"), "--training-flags", " ".join(FAST[2:])]
    assert ablation_main(argv) == 0
    printed = capsys.readouterr().out
    assert "training current-resnet18-e1-s0" in printed
    table = printed[printed.index("resnet18, 1 epochs"):]
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert {"current", "ema", "tta-flips"} <= set(rows)
    assert re.search(r"\| 0 \| 0\.\d{3} \(0\.\d{3}-0\.\d{3}\)", rows["tta-flips"])
    report = json.loads((tmp_path / "ablation" / "current-resnet18-e1-s0.json").read_text())
    assert "test" not in report and "calibration" not in report and report["arguments"]["ema"] > 0
    assert "calibration" not in torch.load(tmp_path / "ablation" / "current-resnet18-e1-s0.pt", weights_only=True)
    log = (tmp_path / "ablation" / "current-resnet18-e1-s0.log").read_text()
    assert ablation_main(argv) == 0  # finished runs are read, not repeated
    assert (tmp_path / "ablation" / "current-resnet18-e1-s0.log").read_text() == log
    assert capsys.readouterr().out == table  # the same table, nothing trained
    # A run redone by hand since its metrics were cached is read again.
    report_path = tmp_path / "ablation" / "current-resnet18-e1-s0.json"
    report["history"][-1]["raw_val_balanced_accuracy"] = 0.123
    report_path.write_text(json.dumps(report))
    os.utime(report_path, (time.time() + 5, time.time() + 5))
    assert ablation_main([*argv, "--report-only"]) == 0
    assert "| current | 0 | 0.123 (0.123-0.123) |" in capsys.readouterr().out


@pytest.mark.slow  # tens of seconds: ./test.sh quick leaves it out
def test_ablation_runs_in_parallel_and_a_failed_run_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path / "ham", "download")
    argv = [str(tmp_path / "ham"), "--epochs", "1", "--seeds", "0", "--levers", "current", "cutmix", "--out",
            str(tmp_path / "ablation"), "--parallel", "2"]
    assert ablation_main([*argv, "--training-flags", " ".join(FAST[2:])]) == 0
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| current", "| cutmix"]
    assert json.loads((tmp_path / "ablation" / "cutmix-resnet18-e1-s0.json").read_text())["arguments"]["cutmix"] == 1.0
    with pytest.raises(subprocess.CalledProcessError):
        ablation_main([*argv, "--seeds", "1", "--levers", "current", "--training-flags", " ".join([*FAST[2:], "--no-such-flag"])])


def test_ablation_table_pairs_each_lever_with_the_current_recipe_on_the_same_seeds() -> None:
    def row(balanced: float) -> dict:
        return {"val_balanced_accuracy": balanced, "val_accuracy": 0.7, "val_macro_auc": 0.9, "val_melanoma_auc": 0.8}

    table = format_table({"current": {0: row(0.50), 1: row(0.60)}, "lever": {0: row(0.54), 1: row(0.62)}}, [0, 1])
    assert "| current | 0,1 | 0.550 (0.500-0.600) |" in table and table.endswith("| +0.030 |")


def test_resume_with_a_different_schedule_is_a_clear_error(trained: Trained, tmp_path: Path) -> None:
    """The one-cycle schedule is fixed by --epochs: continuing it for more epochs used to crash mid-run."""
    (tmp_path / "runs" / "resnet18").mkdir(parents=True)
    shutil.copy(trained.run_dir / "last.pt", tmp_path / "runs" / "resnet18" / "last.pt")
    steps = torch.load(trained.run_dir / "last.pt", weights_only=False)["scheduler"]["total_steps"]
    per_epoch = steps // 2
    with pytest.raises(SystemExit, match=rf"continues a {steps}-step schedule, but this run has {3 * per_epoch} steps "
                                         rf"\(3 epochs of {per_epoch} batches\); resume with the same --epochs"):
        train(fast_args(trained.root, tmp_path, "--epochs", "3", "--resume"))
    assert not (tmp_path / "out" / "resnet18.pt").exists()


# ---------------------------------------------------------------------------------------- evaluation


def test_metrics_on_a_hand_made_case() -> None:
    akiec, bcc, bkl, df, mel, nv, vasc = range(7)
    labels = np.array([mel, mel, mel, mel, nv, nv, nv, nv, nv, bcc])
    preds = np.array([mel, mel, mel, nv, nv, nv, nv, mel, nv, bcc])
    probs = np.full((10, 7), 0.05)
    probs[np.arange(10), preds] = 0.7  # every row sums to 1, the prediction at 0.7

    m = compute_metrics(labels, probs)

    assert m["n_images"] == 10
    assert m["accuracy"] == pytest.approx(0.8)  # 3 + 4 + 1 right
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 5 + 1) / 3)  # over the classes present
    expected = np.zeros((7, 7), dtype=int)
    expected[mel, mel], expected[mel, nv], expected[nv, nv], expected[nv, mel], expected[bcc, bcc] = 3, 1, 4, 1, 1
    assert m["confusion_matrix"] == expected.tolist()
    assert m["classes"] == list(CLASS_CODES)
    pc = m["per_class"]
    assert (pc["mel"]["recall"], pc["mel"]["precision"], pc["mel"]["f1"]) == pytest.approx((0.75, 0.75, 0.75))
    assert (pc["nv"]["recall"], pc["nv"]["precision"]) == pytest.approx((0.8, 0.8))
    assert (pc["bcc"]["recall"], pc["bcc"]["precision"]) == pytest.approx((1.0, 1.0))
    assert [pc[c]["support"] for c in CLASS_CODES] == [0, 1, 0, 0, 4, 5, 0]
    assert all(pc[c]["recall"] == pc[c]["precision"] == 0 for c in ("akiec", "bkl", "df", "vasc"))
    assert m["melanoma_sensitivity"] == pytest.approx(3 / 4)
    assert m["melanoma_specificity"] == pytest.approx(5 / 6)  # 6 non-melanomas, one called melanoma
    # one-vs-rest AUC with ties counted half: mel (15 + 8/2) / 24 pairs, nv (16 + 8/2) / 25, bcc separates perfectly
    assert pc["mel"]["auc"] == pytest.approx(19 / 24)
    assert pc["nv"]["auc"] == pytest.approx(20 / 25)
    assert pc["bcc"]["auc"] == pytest.approx(1.0)
    assert np.isnan(pc["df"]["auc"])
    assert m["macro_auc"] == pytest.approx((19 / 24 + 20 / 25 + 1.0) / 3)
    assert m["expected_calibration_error"] == pytest.approx(0.1)  # confidence 0.7 everywhere, accuracy 0.8
    assert pc["mel"]["mean_probability"] == pytest.approx((4 * 0.7 + 6 * 0.05) / 10)  # 4 rows predict melanoma
    assert pc["mel"]["mean_confidence"] == pytest.approx(0.7) and np.isnan(pc["df"]["mean_confidence"])


def test_malignant_calibration_error_reads_p_malignant_as_a_probability() -> None:
    akiec, bcc, bkl, df, mel, nv, vasc = range(7)
    probs = np.zeros((10, 7))
    probs[:5, [mel, nv]] = 0.62, 0.38  # P(malignant) 0.62: 4 of these 5 are malignant
    probs[5:, [bcc, nv]] = 0.1, 0.9  # P(malignant) 0.1: 1 of these 5
    labels = np.array([mel, mel, bcc, akiec, nv, bcc, nv, nv, bkl, vasc])
    assert malignant_calibration_error(labels, probs) == pytest.approx(0.5 * (0.8 - 0.62) + 0.5 * (0.2 - 0.1))
    assert malignant_calibration_error(labels, probs) == compute_metrics(labels, probs)["malignant_calibration_error"]


def test_a_perfectly_calibrated_model_measures_about_its_calibration_error_floor() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(7, 0.3), size=1500)
    floor = calibration_error_floor(probs)
    assert 0 < floor["mean"] < floor["p95"] < 0.1
    # Labels drawn from the probabilities themselves: each draw's ECE sits inside the floor's spread.
    measured = [expected_calibration_error(np.array([rng.choice(7, p=p) for p in probs]), probs) for _ in range(20)]
    assert floor["mean"] / 2 < np.mean(measured) < floor["p95"]
    assert sum(m > floor["p95"] for m in measured) <= 3
    # The floor shrinks with more images, and an overconfident model measures far above it.
    assert calibration_error_floor(np.tile(probs, (8, 1)))["p95"] < floor["mean"]
    labels = np.array([rng.choice(7, p=p) for p in probs])
    sharpened = probs**4 / (probs**4).sum(1, keepdims=True)
    assert expected_calibration_error(labels, sharpened) > 3 * calibration_error_floor(sharpened)["p95"]


def test_a_certain_model_has_no_calibration_error_floor() -> None:
    assert calibration_error_floor(np.eye(7)[[0, 3, 5, 5]]) == {"mean": 0.0, "p95": 0.0}


def test_metrics_without_melanoma_cases() -> None:
    labels = np.array([0, 1, 5, 5])
    probs = np.eye(7)[[0, 4, 5, 5]]  # the bcc is called melanoma
    m = compute_metrics(labels, probs)
    assert np.isnan(m["melanoma_sensitivity"])
    assert m["melanoma_specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(3 / 4) and m["per_class"]["mel"]["precision"] == 0


def test_evaluate_cli_scores_every_image_it_finds(trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = write_dataset(tmp_path / "ham", "download")
    absent = {rows[3]["image_id"], rows[40]["image_id"]}
    for image_id in absent:  # listed but absent: skipped, not an error
        next((tmp_path / "ham").rglob(f"{image_id}.jpg")).unlink()
    out = tmp_path / "metrics.json"

    code = evaluate_main([str(tmp_path / "ham"), "--type", "resnet18", "--weights", str(trained.weights), "--json", str(out)])

    assert code == 0
    metrics = json.loads(out.read_text())
    assert {"accuracy", "balanced_accuracy", "macro_auc", "per_class", "confusion_matrix", "n_images"} <= set(metrics)
    assert metrics["n_images"] == len(rows) - len(absent) == 61
    assert np.array(metrics["confusion_matrix"]).sum() == 61
    assert [metrics["per_class"][c]["support"] for c in CLASS_CODES] == [
        sum(r["dx"] == c and r["image_id"] not in absent for r in rows) for c in CLASS_CODES
    ]
    # the same numbers as scoring the found images directly with the serving predictor
    samples = [s for s in read_samples(tmp_path / "ham", require_images=False) if s.path is not None]
    probs = predict_samples(Predictor.from_checkpoint(trained.weights), samples)
    expected = compute_metrics(np.array([s.label for s in samples]), probs)
    assert metrics["confusion_matrix"] == expected["confusion_matrix"]
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    floor = metrics["expected_calibration_error_if_calibrated"]
    assert floor == pytest.approx(expected["expected_calibration_error_if_calibrated"])
    assert metrics["macro_auc"] == pytest.approx(expected["macro_auc"])
    printed = capsys.readouterr().out
    assert "images                 61" in printed and f"95% below {floor['p95']:.4f}" in printed


def test_evaluate_cli_on_the_test_split_reproduces_the_training_report(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "test.json"
    code = evaluate_main([str(trained.root), "--split", "test", "--type", "resnet18", "--weights", str(trained.weights),
                          "--json", str(out)])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["n_images"] == trained.report["images"]["test"]
    assert metrics["confusion_matrix"] == trained.report["test"]["confusion_matrix"]
    assert metrics["balanced_accuracy"] == pytest.approx(trained.report["test"]["balanced_accuracy"])


def test_evaluate_cli_averages_an_ensemble_of_checkpoints(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "ensemble.json"
    member = ROOT / "model_store" / "resnet34.pt"  # another architecture, input size and preprocessing
    code = evaluate_main([str(trained.root), "--split", "test", "--type", "resnet18", "--weights", str(trained.weights),
                          "--ensemble", str(member), "--json", str(out)])
    assert code == 0
    metrics = json.loads(out.read_text())
    samples = split_dataset(trained.root, 0)[2]
    probs = (predict_samples(Predictor.from_checkpoint(trained.weights), samples)
             + predict_samples(Predictor.from_checkpoint(member), samples)) / 2
    expected = compute_metrics(np.array([s.label for s in samples]), probs)
    assert metrics["ensemble"] == [str(member)] and metrics["confusion_matrix"] == expected["confusion_matrix"]
    assert metrics["macro_auc"] == pytest.approx(expected["macro_auc"])
    assert metrics["macro_auc"] != pytest.approx(trained.report["test"]["macro_auc"])  # the member counted


def test_evaluate_cli_rejects_the_wrong_architecture(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate_main([str(trained.root), "--type", "resnet34", "--weights", str(trained.weights)]) == 2
    assert "holds a resnet18, not a resnet34" in capsys.readouterr().err
