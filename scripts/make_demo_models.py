"""Build tiny but real nnU-Net v2 demo models, trained on CPU on synthetic data, plus a demo study.

Usage:
    python scripts/make_demo_models.py [--work-dir DIR] [--out examples] [--seed 0]

Writes OUT/models/{organ,organ2d,lesion,organ_nomirror}/ (dataset.json, plans.json,
fold_N/checkpoint_final.pth), OUT/models/dice.json and the held-out study
OUT/study/{T2,ADC,labels}/.
Takes a few minutes on two CPU cores.
"""

import argparse
import json
import os
import random
import shutil
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHAPE_ZYX = (24, 48, 48)
SPACING_XYZ = (1.25, 1.25, 2.5)
ORIGIN_XYZ = (-31.25, -42.5, 17.5)
ADC_SPACING_XYZ = (2.0, 2.0, 3.0)
NOISE_SD = 10.0
N_TRAIN = 24
N_TEST = 5
DEMO_CASE = 0
EPOCHS = 4
ITERATIONS_PER_EPOCH = 25
VAL_ITERATIONS_PER_EPOCH = 5
LEARNING_RATE = 1e-2
FEATURES_PER_STAGE = [8, 16, 32]
BATCH_SIZE = {3: 2, 2: 16}  # by patch dimensionality; 2d with 8 slices stayed below Dice 0.8
MIN_DICE = 0.8
WORK_MARKER = ".demo-models-work"
PLANS = "nnUNetPlans"
# nnU-Net's own (lower-case) environment variable names
ENV_PATHS = {
    "nnUNet_raw": "raw",
    "nnUNet_preprocessed": "preprocessed",
    "nnUNet_results": "results",
}
ENV_N_PROC = "nnUNet_def_n_proc"
ENV_N_PROC_DA = "nnUNet_n_proc_DA"
PRIMUS_TRAINERS = "nnunetv2.training.nnUNetTrainer.primus.primus_trainers"

ORGAN = {
    "id": 1,
    "name": "Dataset001_Organ",
    "channels": {"0": "T2"},
    "labels": {"background": 0, "prostate": 1, "bladder": 2},
}
LESION = {
    "id": 2,
    "name": "Dataset002_Lesion",
    "channels": {"0": "T2", "1": "ADC"},
    "labels": {"background": 0, "lesion": 1},
}


@dataclass(frozen=True)
class ModelSpec:
    """One exported demo model: which dataset, configuration, trainer and folds."""

    name: str
    dataset: dict
    configuration: str
    trainer: str
    folds: tuple[int, ...]


MODELS = (
    ModelSpec("organ", ORGAN, "3d_fullres", "nnUNetTrainer", (0, 1)),
    ModelSpec("organ2d", ORGAN, "2d", "nnUNetTrainer", (0,)),
    ModelSpec("lesion", LESION, "3d_fullres", "nnUNetTrainer", (0,)),
    ModelSpec("organ_nomirror", ORGAN, "3d_fullres", "nnUNetTrainerNoMirroring", (0,)),
)


@dataclass
class Case:
    """One synthetic case on the T2 grid: two image channels and the three masks."""

    t2: np.ndarray
    adc: np.ndarray
    prostate: np.ndarray
    bladder: np.ndarray
    lesion: np.ndarray

    @property
    def organ_labels(self) -> np.ndarray:
        """Organ label map: 1 prostate (lesion included), 2 bladder."""
        return (self.prostate * 1 + self.bladder * 2).astype(np.uint8)


def log(message: str) -> None:
    """Print one progress line."""
    print(f"[make_demo_models] {message}", flush=True)


# ---------------------------------------------------------------- synthetic data


def grid_mm() -> np.ndarray:
    """Physical voxel coordinates (z, y, x) in mm from the first voxel, shape (3, *SHAPE_ZYX)."""
    spacing_zyx = np.array(SPACING_XYZ[::-1]).reshape(3, 1, 1, 1)
    return np.indices(SHAPE_ZYX, dtype=np.float64) * spacing_zyx


def rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Small random 3D rotation matrix (z, y, x rotations of at most max_degrees)."""
    a, b, c = np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3))
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def ellipsoid(
    grid: np.ndarray, centre: np.ndarray, radii: np.ndarray, rot: np.ndarray
) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid (all quantities in mm, zyx order)."""
    offsets = np.tensordot(rot.T, grid - centre.reshape(3, 1, 1, 1), axes=1)
    return (((offsets / radii.reshape(3, 1, 1, 1)) ** 2).sum(axis=0)) <= 1.0


def make_masks(
    rng: np.random.Generator, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prostate, bladder apart from it, and a lesion strictly inside the prostate."""
    extent = np.array(SHAPE_ZYX) * np.array(SPACING_XYZ[::-1])
    for _ in range(1000):
        radii_a = rng.uniform(10.0, 14.0, 3)
        radii_b = rng.uniform(8.0, 11.0, 3)
        centre_a = rng.uniform(radii_a.max() + 2.0, extent - radii_a.max() - 2.0)
        centre_b = rng.uniform(radii_b.max() + 2.0, extent - radii_b.max() - 2.0)
        if np.linalg.norm(centre_a - centre_b) < radii_a.max() + radii_b.max() + 3.0:
            continue
        prostate = ellipsoid(grid, centre_a, radii_a, rotation(rng, 15.0))
        bladder = ellipsoid(grid, centre_b, radii_b, rotation(rng, 15.0))
        radii_l = rng.uniform(4.5, 6.5, 3)
        centre_l = centre_a + rng.uniform(-0.3, 0.3, 3) * (radii_a - radii_l)
        lesion = ellipsoid(grid, centre_l, radii_l, rotation(rng, 15.0))
        if lesion.any() and not (lesion & ~eroded(prostate)).any():
            return prostate, bladder, lesion
    raise RuntimeError("could not place the ellipsoids in 1000 tries; check the size constants")


def eroded(mask: np.ndarray) -> np.ndarray:
    """Mask eroded by a ball of radius one voxel."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryErode(image, [1, 1, 1])).astype(bool)


def make_case(rng: np.random.Generator, grid: np.ndarray) -> Case:
    """One noisy case: T2 prostate 100/bladder 200/lesion 50, ADC prostate 40/lesion 150."""
    prostate, bladder, lesion = make_masks(rng, grid)
    t2 = np.zeros(SHAPE_ZYX)
    t2[prostate] = 100.0
    t2[bladder] = 200.0
    t2[lesion] = 50.0
    adc = np.zeros(SHAPE_ZYX)
    adc[prostate] = 40.0
    adc[lesion] = 150.0
    t2 += rng.normal(0.0, NOISE_SD, SHAPE_ZYX)
    adc += rng.normal(0.0, NOISE_SD, SHAPE_ZYX)
    return Case(t2.astype(np.float32), adc.astype(np.float32), prostate, bladder, lesion)


def to_image(array: np.ndarray) -> sitk.Image:
    """Wrap a zyx array as a SimpleITK image on the T2 grid."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    return image


def write(array: np.ndarray, path: Path) -> None:
    """Write a zyx array on the T2 grid as NIfTI, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_image(array), str(path))


def write_raw_datasets(raw: Path, cases: list[Case]) -> None:
    """Write both training datasets in nnU-Net raw format with their dataset.json."""
    for dataset in (ORGAN, LESION):
        root = raw / dataset["name"]
        for i, case in enumerate(cases):
            write(case.t2, root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
            if dataset is LESION:
                write(case.adc, root / "imagesTr" / f"case_{i:03d}_0001.nii.gz")
            label = case.organ_labels if dataset is ORGAN else case.lesion.astype(np.uint8)
            write(label, root / "labelsTr" / f"case_{i:03d}.nii.gz")
        dataset_json = {
            "channel_names": dataset["channels"],
            "labels": dataset["labels"],
            "numTraining": len(cases),
            "file_ending": ".nii.gz",
            "name": dataset["name"],
            "description": "Synthetic ellipsoids made by scripts/make_demo_models.py",
        }
        (root / "dataset.json").write_text(json.dumps(dataset_json, indent=2))


def resample_to_coarse_grid(image: sitk.Image) -> sitk.Image:
    """Linearly resample an image onto a coarser grid covering the same physical extent."""
    spacing = np.array(image.GetSpacing())
    coarse = np.array(ADC_SPACING_XYZ)
    extent = spacing * np.array(image.GetSize())
    size = [round(e) for e in extent / coarse]
    origin = np.array(image.GetOrigin()) - spacing / 2 + coarse / 2
    reference = sitk.Image(size, image.GetPixelID())
    reference.SetSpacing(tuple(coarse))
    reference.SetOrigin(tuple(origin))
    reference.SetDirection(image.GetDirection())
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)


def write_study(out: Path, case: Case) -> None:
    """Write the demo study: T2, ADC on a coarser grid, ground-truth labels on the T2 grid."""
    study = out / "study"
    shutil.rmtree(study, ignore_errors=True)
    write(case.t2, study / "T2" / "T2.nii.gz")
    (study / "ADC").mkdir(parents=True)
    sitk.WriteImage(resample_to_coarse_grid(to_image(case.adc)), str(study / "ADC" / "ADC.nii.gz"))
    write(case.organ_labels, study / "labels" / "organ.nii.gz")
    write(case.lesion.astype(np.uint8), study / "labels" / "lesion.nii.gz")


# ---------------------------------------------------------------- nnU-Net planning


def prepare_work_dir(work: Path) -> None:
    """Create a fresh scratch folder; refuse to wipe a folder this script did not create."""
    if work.exists() and any(work.iterdir()):
        if not (work / WORK_MARKER).exists():
            sys.exit(
                f"error: --work-dir {work} is not empty and was not made by this script; "
                "pick another folder or delete it yourself"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).touch()


def skip_primus_trainers() -> None:
    """Hide nnU-Net's Primus trainers (unused here) from its search for trainers by name.

    recursive_find_trainer_class_by_name, used for training and by nnUNetPredictor, imports every
    trainer module on its way to e.g. nnUNetTrainerNoMirroring. primus_trainers imports timm, which
    needs torchvision, and a torchvision built for another torch fails with "operator
    torchvision::nms does not exist". An empty placeholder module makes the search pass it by.
    """
    sys.modules.setdefault(PRIMUS_TRAINERS, types.ModuleType(PRIMUS_TRAINERS))


def set_nnunet_environment(work: Path) -> None:
    """Point nnU-Net at the scratch folders; must happen before nnunetv2 is imported."""
    if "nnunetv2" in sys.modules:
        raise RuntimeError("nnunetv2 was imported before its environment variables were set")
    for var, sub in ENV_PATHS.items():
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str((work / sub).resolve())
    n_cpu = str(os.cpu_count() or 1)
    os.environ[ENV_N_PROC] = n_cpu
    os.environ[ENV_N_PROC_DA] = n_cpu  # 0 would crash planning: torch.set_num_threads(0)
    skip_primus_trainers()


def shrink_configuration(config: dict) -> None:
    """Shrink a planned configuration: 3 stages of 8/16/32 features, whole-image patch."""
    n_stages = len(FEATURES_PER_STAGE)
    kwargs = config["architecture"]["arch_kwargs"]
    if kwargs["n_stages"] < n_stages:
        raise RuntimeError(f"nnU-Net planned {kwargs['n_stages']} stages, fewer than {n_stages}")
    config["patch_size"] = [int(s) for s in config["median_image_size_in_voxels"]]
    config["batch_size"] = BATCH_SIZE[len(config["patch_size"])]
    kwargs["n_stages"] = n_stages
    kwargs["features_per_stage"] = list(FEATURES_PER_STAGE)
    for key in ("kernel_sizes", "strides", "n_conv_per_stage"):
        kwargs[key] = kwargs[key][:n_stages]
    kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][: n_stages - 1]
    total_stride = np.prod(kwargs["strides"], axis=0)
    if np.any(np.array(config["patch_size"]) % total_stride):
        raise RuntimeError(
            f"patch size {config['patch_size']} is not divisible by the total stride {total_stride}"
        )


def plan_and_preprocess(dataset: dict, configurations: list[str], preprocessed: Path) -> None:
    """Fingerprint, plan, shrink the plans to the given configurations, then preprocess them."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    n_proc = int(os.environ[ENV_N_PROC])
    extract_fingerprints(
        [dataset["id"]],
        num_processes=n_proc,
        check_dataset_integrity=True,
        verbose=False,
        show_progress_bar=False,
    )
    plan_experiments([dataset["id"]])
    plans_file = preprocessed / dataset["name"] / f"{PLANS}.json"
    plans = json.loads(plans_file.read_text())
    missing = [c for c in configurations if c not in plans["configurations"]]
    if missing:
        raise RuntimeError(f"nnU-Net did not plan configuration(s) {missing} for {dataset['name']}")
    plans["configurations"] = {c: plans["configurations"][c] for c in configurations}
    for config in plans["configurations"].values():
        shrink_configuration(config)
    plans_file.write_text(json.dumps(plans, indent=2))
    preprocess(
        [dataset["id"]],
        PLANS,
        configurations,
        [n_proc] * len(configurations),
        show_progress_bar=False,
    )


# ---------------------------------------------------------------- training and export


def demo_trainer_class(base_name: str) -> type:
    """Subclass the named nnU-Net trainer for fast CPU training: AdamW, a few short epochs."""
    import torch
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    base = recursive_find_trainer_class_by_name(base_name)

    class DemoTrainer(base):
        """Short CPU schedule; nnU-Net's default SGD does not converge in so few iterations."""

        def __init__(
            self,
            plans: dict,
            configuration: str,
            fold: int,
            dataset_json: dict,
            device: torch.device,
        ) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.initial_lr = LEARNING_RATE
            self.num_epochs = EPOCHS
            self.num_iterations_per_epoch = ITERATIONS_PER_EPOCH
            self.num_val_iterations_per_epoch = VAL_ITERATIONS_PER_EPOCH

        def configure_optimizers(self) -> tuple:
            """AdamW with nnU-Net's polynomial learning-rate decay."""
            optimizer = torch.optim.AdamW(
                self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay
            )
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    DemoTrainer.__name__ = DemoTrainer.__qualname__ = f"Demo{base_name}"
    return DemoTrainer


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch random number generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(spec: ModelSpec, fold: int, seed: int, preprocessed: Path) -> Path:
    """Train one fold of a model spec on CPU; return the nnU-Net results folder of that trainer."""
    import torch

    seed_everything(seed + fold)
    root = preprocessed / spec.dataset["name"]
    plans = json.loads((root / f"{PLANS}.json").read_text())
    plans["continue_training"] = False  # nnUNetTrainer.__init__ pops this key
    dataset_json = json.loads((root / "dataset.json").read_text())
    trainer_class = demo_trainer_class(spec.trainer)
    trainer = trainer_class(
        plans=plans,
        configuration=spec.configuration,
        fold=fold,
        dataset_json=dataset_json,
        device=torch.device("cpu"),
    )
    trainer.run_training()
    return Path(trainer.output_folder_base)


def export_model(spec: ModelSpec, results: Path, models: Path) -> Path:
    """Copy plans, dataset.json and slimmed final checkpoints naming the standard trainer."""
    import torch

    dest = models / spec.name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(results / name, dest / name)
    plans = json.loads((dest / "plans.json").read_text())
    for fold in spec.folds:
        source = results / f"fold_{fold}" / "checkpoint_final.pth"
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
        configuration = checkpoint["init_args"]["configuration"]
        if configuration != spec.configuration or configuration not in plans["configurations"]:
            raise RuntimeError(
                f"{spec.name} fold {fold}: checkpoint configuration "
                f"{configuration!r} does not match {spec.configuration!r}"
            )
        checkpoint["trainer_name"] = spec.trainer
        checkpoint.pop("optimizer_state")
        checkpoint.pop("grad_scaler_state")
        for key in ("epoch_start_timestamps", "epoch_end_timestamps"):  # keep reruns byte-identical
            checkpoint["logging"].pop(key)
        (dest / f"fold_{fold}").mkdir()
        torch.save(checkpoint, dest / f"fold_{fold}" / "checkpoint_final.pth")
    return dest


# ---------------------------------------------------------------- evaluation


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * (prediction & truth).sum() / total)


def evaluate(spec: ModelSpec, model_dir: Path, cases: list[Case]) -> dict[str, float]:
    """Mean Dice per foreground label over held-out cases, predicted by nnUNetPredictor on CPU."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=spec.folds)
    labels = {name: value for name, value in spec.dataset["labels"].items() if value > 0}
    scores: dict[str, list[float]] = {name: [] for name in labels}
    for case in cases:
        channels = [case.t2] if spec.dataset is ORGAN else [case.t2, case.adc]
        truth = case.organ_labels if spec.dataset is ORGAN else case.lesion.astype(np.uint8)
        properties = {"spacing": list(SPACING_XYZ[::-1])}
        prediction = predictor.predict_single_npy_array(np.stack(channels), properties)
        for name, value in labels.items():
            scores[name].append(dice(prediction == value, truth == value))
    return {name: round(float(np.mean(values)), 4) for name, values in scores.items()}


def folder_size(path: Path) -> int:
    """Total size in bytes of all files below path."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def report(dice_table: dict[str, dict[str, float]], model_dirs: list[Path]) -> None:
    """Print the Dice table and the size of each exported model folder."""
    print(f"\n{'model':<16}{'label':<10}{'Dice':>7}")
    for model, scores in dice_table.items():
        for label, value in scores.items():
            print(f"{model:<16}{label:<10}{value:>7.3f}")
    print()
    for model_dir in model_dirs:
        print(f"{model_dir}: {folder_size(model_dir) / 1024:.0f} KiB")


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("build/demo-models-work"),
        help="scratch folder for nnU-Net raw/preprocessed/results (wiped each run)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("examples"),
        help="output folder; models go to OUT/models, the demo study to OUT/study",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for data and training")
    return parser.parse_args()


def main() -> None:
    """Generate data, plan, train, export, write the demo study and check Dice."""
    args = parse_args()
    start = time.monotonic()
    prepare_work_dir(args.work_dir)
    set_nnunet_environment(args.work_dir)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(args.seed)
    grid = grid_mm()
    cases = [make_case(rng, grid) for _ in range(N_TRAIN + N_TEST)]
    train_cases, test_cases = cases[:N_TRAIN], cases[N_TRAIN:]
    log(f"generated {N_TRAIN} training and {N_TEST} held-out cases")
    write_raw_datasets(args.work_dir / "raw", train_cases)

    preprocessed = args.work_dir / "preprocessed"
    for dataset in (ORGAN, LESION):
        configurations = sorted({m.configuration for m in MODELS if m.dataset is dataset})
        log(f"planning and preprocessing {dataset['name']} ({', '.join(configurations)})")
        plan_and_preprocess(dataset, configurations, preprocessed)
    # single-threaded data augmentation: deterministic, and no spawned workers on a 2-core machine
    os.environ[ENV_N_PROC_DA] = "0"

    models = args.out / "models"
    (models / "dice.json").unlink(missing_ok=True)
    model_dirs = []
    for spec in MODELS:
        for fold in spec.folds:
            log(
                f"training {spec.name} ({spec.trainer}, {spec.configuration}) fold {fold} "
                f"[{time.monotonic() - start:.0f} s]"
            )
            results = train(spec, fold, args.seed, preprocessed)
        model_dirs.append(export_model(spec, results, models))

    write_study(args.out, test_cases[DEMO_CASE])
    log(f"wrote demo study (held-out case {DEMO_CASE}) to {args.out / 'study'}")

    dice_table = {}
    for spec, model_dir in zip(MODELS, model_dirs, strict=True):
        log(f"evaluating {spec.name} on {N_TEST} held-out cases")
        dice_table[spec.name] = evaluate(spec, model_dir, test_cases)
    (models / "dice.json").write_text(json.dumps(dice_table, indent=2) + "\n")
    report(dice_table, model_dirs)
    log(f"done in {time.monotonic() - start:.0f} s")
    failed = [
        f"{model}/{label}={value:.3f}"
        for model, scores in dice_table.items()
        for label, value in scores.items()
        if value < MIN_DICE
    ]
    if failed:
        sys.exit(f"error: held-out Dice below {MIN_DICE}: {', '.join(failed)}")


if __name__ == "__main__":
    main()
