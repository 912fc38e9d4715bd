"""nnU-Net v2 steps of ``peer_nnunet.py``, run by the nnU-Net venv's python (imports nnunetv2).

``peer_nnunet.py`` (medseg venv) starts one process per step with ``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``, ``nnUNet_n_proc_DA`` and ``OMP_NUM_THREADS`` set;
each step writes its result as JSON to ``--result``::

    plan        fingerprint (with nnU-Net's dataset integrity check) + experiment planning
    preprocess  nnU-Net's preprocessing of ``--configurations``
    measure     seconds per training iteration of a configuration, estimated from one synthetic
                forward/backward step (random data; no data loading, augmentation or Dice term:
                cross-entropy on every deep-supervision output) at batch 1 and a patch of at most
                MEASURE_VOXELS voxels, scaled linearly in voxels to the planned batch and patch
    train       fold k with ``nnUNetTrainerBudget`` (``peer_nnunet_trainer.py``), built here
                directly (nnU-Net looks trainers up only inside its own package)
    predict     the fold's held-out cases with ``nnUNetPredictor`` (tile_step_size 0.5, Gaussian,
                mirroring on or off) from ``checkpoint_final.pth``, one case at a time, timed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

SCRIPT_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPT_DIR))  # peer_budget, peer_nnunet_trainer

PLANS = "nnUNetPlans"
#: voxels (batch x patch) a synthetic measurement step may take (3-D: about 1.5 GB of CPU memory)
MEASURE_VOXELS = 2**19


def _dataset_name(dataset_id: int) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    return convert_id_to_dataset_name(dataset_id)


def _preprocessed(dataset_id: int) -> Path:
    return Path(os.environ["nnUNet_preprocessed"]) / _dataset_name(dataset_id)


def _load(dataset_id: int) -> tuple[dict, dict]:
    base = _preprocessed(dataset_id)
    plans = json.loads((base / f"{PLANS}.json").read_text())
    return plans, json.loads((base / "dataset.json").read_text())


def step_plan(args: argparse.Namespace) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    t0 = time.monotonic()
    extract_fingerprints([args.dataset_id], num_processes=args.processes, check_dataset_integrity=True,
                         show_progress_bar=False)  # fmt: skip
    t1 = time.monotonic()
    plan_experiments([args.dataset_id])
    t2 = time.monotonic()
    plans = json.loads((_preprocessed(args.dataset_id) / f"{PLANS}.json").read_text())
    summary = {name: {k: c.get(k) for k in ("batch_size", "patch_size", "spacing", "data_identifier")}
               for name, c in plans["configurations"].items()}  # fmt: skip
    return {"fingerprint_s": round(t1 - t0, 2), "planning_s": round(t2 - t1, 2), "configurations": summary}


def step_preprocess(args: argparse.Namespace) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    t0 = time.monotonic()
    preprocess([args.dataset_id], PLANS, configurations=args.configurations, num_processes=[args.processes],
               show_progress_bar=False)  # fmt: skip
    return {"preprocessing_s": round(time.monotonic() - t0, 2), "configurations": args.configurations}


def step_measure(args: argparse.Namespace) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset_json = _load(args.dataset_id)
    pm = PlansManager(plans)
    cm = pm.get_configuration(args.configuration)
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    net = nnUNetTrainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset_json), heads, True)
    strides = cm.network_arch_init_kwargs.get("strides") or [[1] * len(cm.patch_size)]
    divisor = [math.prod(s[axis] if isinstance(s, list | tuple) else s for s in strides) for axis in range(len(cm.patch_size))]
    full = cm.batch_size * math.prod(cm.patch_size)
    batch, patch = cm.batch_size, list(cm.patch_size)
    if full > MEASURE_VOXELS:
        batch = 1
        factor = (MEASURE_VOXELS / math.prod(patch)) ** (1 / len(patch)) if math.prod(patch) > MEASURE_VOXELS else 1.0
        patch = [max(d, int(p * factor) // d * d) for p, d in zip(patch, divisor, strict=True)]
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(batch, determine_num_input_channels(pm, cm, dataset_json), *patch)
    times = []
    for _ in range(2):  # a warm-up step, then the timed one
        t0 = time.monotonic()
        optimizer.zero_grad(set_to_none=True)
        outputs = net(x)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        loss = sum(torch.nn.functional.cross_entropy(o, torch.randint(0, heads, (o.shape[0], *o.shape[2:]))) for o in outputs)
        loss.backward()
        optimizer.step()
        times.append(time.monotonic() - t0)
    scale = full / (batch * math.prod(patch))
    return {"configuration": args.configuration, "measured_batch": batch, "measured_patch": patch,
            "planned_batch": cm.batch_size, "planned_patch": list(cm.patch_size), "measured_step_s": round(times[-1], 3),
            "voxel_scale": round(scale, 3), "sec_per_iteration_estimate": round(times[-1] * scale, 3)}  # fmt: skip


def step_train(args: argparse.Namespace) -> dict:
    from peer_nnunet_trainer import nnUNetTrainerBudget

    start = time.monotonic()
    plans, dataset_json = _load(args.dataset_id)
    plans["continue_training"] = False
    trainer = nnUNetTrainerBudget(plans=plans, configuration=args.configuration, fold=args.fold,
                                  dataset_json=dataset_json, device=torch.device(args.device))  # fmt: skip
    trainer.set_budget(args.budget_s, start)
    trainer.run_training()  # no perform_actual_validation: peer_nnunet.py predicts and scores the fold itself
    return {"configuration": args.configuration, "fold": args.fold, "output_folder": trainer.output_folder,
            **trainer.budget_record}  # fmt: skip


def load_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint with ``weights_only=True``: only tensors, containers and the numpy
    scalar/dtype types its logging holds are unpickled (never arbitrary objects)."""
    import numpy as np
    from numpy._core.multiarray import scalar

    allowed = [scalar, np.dtype, *{type(np.dtype(t)) for t in (np.float32, np.float64, np.int64, np.bool_)}]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def step_predict(args: argparse.Namespace) -> dict:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model_dir = Path(args.model_dir)
    plans = json.loads((model_dir / "plans.json").read_text())
    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    checkpoint = load_checkpoint(model_dir / f"fold_{args.fold}" / "checkpoint_final.pth")
    pm = PlansManager(plans)
    cm = pm.get_configuration(checkpoint["init_args"]["configuration"])
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    net = nnUNetTrainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset_json), heads,
                                                   enable_deep_supervision=False)  # fmt: skip
    net.load_state_dict(checkpoint["network_weights"])
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.mirroring == "on",
                                perform_everything_on_device=False, device=torch.device(args.device), verbose=False,
                                allow_tqdm=False)  # fmt: skip
    predictor.manual_initialization(net, pm, cm, [checkpoint["network_weights"]], dataset_json,
                                    checkpoint["trainer_name"], checkpoint.get("inference_allowed_mirroring_axes"))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for case in json.loads(Path(args.cases).read_text()):
        t0 = time.monotonic()
        predictor.predict_from_files_sequential([case["files"]], [str(out / case["case_id"])], save_probabilities=False,
                                                overwrite=True)  # fmt: skip
        seconds[case["case_id"]] = round(time.monotonic() - t0, 2)
        print(f"peer: predicted {case['case_id']} (mirroring {args.mirroring}) in {seconds[case['case_id']]} s", flush=True)
    return {"fold": args.fold, "mirroring": args.mirroring, "case_seconds": seconds,
            "mirror_axes": checkpoint.get("inference_allowed_mirroring_axes")}  # fmt: skip


STEPS = {"plan": step_plan, "preprocess": step_preprocess, "measure": step_measure, "train": step_train,
         "predict": step_predict}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--dataset-id", type=int, required=True)
    p.add_argument("--result", required=True, help="JSON file the step writes its result to")
    p.add_argument("--configurations", nargs="+", default=["2d"])
    p.add_argument("--configuration", default="2d")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-dir")
    p.add_argument("--cases", help="JSON list of {case_id, files: [channel 0, channel 1, ...]}")
    p.add_argument("--out")
    p.add_argument("--mirroring", choices=["on", "off"], default="on")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = STEPS[args.step](args)
    result["torch_threads"] = torch.get_num_threads()
    result["nnUNet_n_proc_DA"] = os.environ.get("nnUNet_n_proc_DA")
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2, default=str))
    print(f"peer: {args.step} done: {args.result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
