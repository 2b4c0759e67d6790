"""Run folders: what one run of the demo writes, and the manifest that makes it one run.

A run folder (`python -m minirlhf.demo --out DIR`) holds

    manifest.json   the run's id, seed, settings and minirlhf version, its status ("running", then
                    "finished"), the stages finished, and the sha256 of every file the run wrote
    split.json      the train / unseen prompt split            metrics.jsonl   every logged step
    sft.npz  reward.npz  policy.npz  value.npz   checkpoints     summary.json    the results

The manifest is rewritten atomically after every file the run adds, and "finished" is written last. So a
folder is one run exactly when its manifest says finished and every file in it is listed there with the
hash it had when written. Two rules keep runs apart:

  start_run refuses a folder that holds anything (another run, finished or not, or files that are no run's),
  unless force=True, which deletes a previous run's files first (a folder holding files no run wrote is
  refused even then: minirlhf deletes only what it wrote). A run starts in an empty folder, so every file
  beside the manifest of a run that did not finish is that run's, written before it could record it (an
  interrupted run's metrics.jsonl): force deletes those too. The manifest is deleted last, so a deletion
  that is itself interrupted leaves a manifest naming what is left, and force can finish the job.
  open_run, which every consumer calls (load_run, the experiments in demos/), refuses a folder whose run did
  not finish, a file that is missing, changed since the run wrote it, or not the run's, naming the file and
  the command that re-makes the run. Temporary files (checkpoint.TMP_PREFIX) that a killed save can leave
  behind are no run's files and are ignored, and so are subfolders: a tool that starts from a finished run
  (the labelling tool, python -m minirlhf.label) writes into a subfolder of it.

Checkpoints also carry the run's id and seed in their info, so a checkpoint copied out of a run still says
where it came from.
"""
import hashlib
import json
import os
import shutil
import uuid

from . import __version__
from . import transformer as tf
from .checkpoint import TMP_PREFIX, atomic_write, load_checkpoint
from .reward import RewardModel
from .world import get_prompt

MANIFEST = "manifest.json"


def write_json(path, obj):
    """Atomic JSON write (checkpoint.atomic_write)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_folder(folder):
    """ValueError unless folder names a directory that is or can be created and is writable."""
    if not isinstance(folder, (str, os.PathLike)) or str(folder).strip() == "":
        raise ValueError("the run folder is an empty path")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file, not a folder: a run needs a folder of its own")
    probe = folder
    while not os.path.exists(probe):  # the nearest existing parent must let us create the folder
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.path.isdir(probe):
        raise ValueError(f"{folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: {'the folder' if probe == folder else probe} is not writable")


def _listing(folder):
    """The files of a run folder that belong to someone: not temporary files of interrupted saves, and not
    subfolders (tools that start from a finished run, such as `python -m minirlhf.label`, write theirs
    there; they are not the run's files)."""
    return sorted(f for f in os.listdir(folder)
                  if not f.startswith(TMP_PREFIX) and not os.path.isdir(os.path.join(folder, f)))


def read_manifest(folder):
    """The manifest of a run folder, or None if it has none; ValueError if it is unreadable."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or "files" not in manifest or "status" not in manifest:
            raise ValueError("not a run manifest")
        if not (isinstance(manifest["files"], dict) and all(isinstance(v, str) for v in manifest["files"].values())
                and isinstance(manifest["status"], str) and isinstance(manifest.get("stages", []), list)):
            raise ValueError("files must map names to hashes, status be a string and stages a list")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable run manifest ({e})") from None
    return manifest


def check_start(folder, force=False):
    """ValueError unless a run may start in folder (module docstring); returns the files a start with force
    deletes. Changes nothing: the command lines call it while parsing their flags."""
    check_folder(folder)
    present = _listing(folder) if os.path.isdir(folder) else []
    if not present:
        return []
    manifest = read_manifest(folder) if MANIFEST in present else None
    if manifest is None:
        raise ValueError(f"{folder} is not empty and holds no run ({', '.join(present[:5])}"
                         f"{', ...' if len(present) > 5 else ''}): choose an empty or new folder")
    if not force:
        raise ValueError(f"{folder} holds another run ({manifest['status']}, seed {manifest.get('seed')}, "
                         f"id {manifest.get('run_id')}): choose another folder, or add --force to replace it")
    # a finished run's unlisted files came after it; an unfinished run's were written by it (docstring)
    foreign = [f for f in present if f != MANIFEST and f not in manifest["files"] and manifest["status"] == "finished"]
    foreign += [d for d in _subfolders(folder) if read_manifest(os.path.join(folder, d)) is None]
    if foreign:
        raise ValueError(f"{folder}: {', '.join(foreign)} belong to no run; --force deletes only what runs "
                         f"wrote, so move them first")
    return present + _subfolders(folder)  # a tool's subfolder (with its own manifest) goes with its run


def _subfolders(folder):
    return sorted(f for f in os.listdir(folder) if os.path.isdir(os.path.join(folder, f)))


def start_run(folder, settings, seed, force=False, remake="python -m minirlhf.demo", parent=None):
    """Start a run in folder (created if needed): its manifest, status "running". Returns the manifest.

    settings: the run's flags (JSON); remake: the command that makes such a run, for messages; parent: the
    manifest of the finished run this one starts from (a tool's run in a subfolder of it), whose id it keeps.
    """
    doomed = check_start(folder, force)
    for f in sorted(doomed, key=lambda f: f == MANIFEST):  # the manifest last (module docstring)
        path = os.path.join(folder, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):  # orphaned temporary files of an earlier, killed run
        if f.startswith(TMP_PREFIX):
            os.unlink(os.path.join(folder, f))
    manifest = {"run_id": uuid.uuid4().hex, "seed": seed, "settings": settings, "minirlhf": __version__,
                "status": "running", "stages": [], "files": {}, "remake": remake,
                "parent_run_id": None if parent is None else parent["run_id"]}
    write_json(os.path.join(folder, MANIFEST), manifest)
    return manifest


def record(folder, manifest, names, stage=None):
    """Add the files `names` (just written) with their hashes, and the stage they finish, to the manifest."""
    for name in names:
        manifest["files"][name] = sha256(os.path.join(folder, name))
    if stage is not None:
        manifest["stages"].append(stage)
    write_json(os.path.join(folder, MANIFEST), manifest)


def finish_run(folder, manifest):
    manifest["status"] = "finished"
    write_json(os.path.join(folder, MANIFEST), manifest)


def _remake(folder, manifest):
    """The command that re-makes the run of a folder, for messages."""
    return f"{manifest.get('remake', 'python -m minirlhf.demo')} --out {folder} --force"


def open_run(folder):
    """The manifest of the finished run in folder, after checking that the folder is that run and nothing
    else (module docstring); ValueError naming what is wrong and how to re-make the run."""
    if not isinstance(folder, (str, os.PathLike)) or str(folder).strip() == "":
        raise ValueError("the run folder is an empty path")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: {'a file, not a run folder' if os.path.exists(folder) else 'no such run folder'}")
    manifest = read_manifest(folder)
    if manifest is None:
        present = _listing(folder)
        raise ValueError(f"{folder} holds no run (no {MANIFEST}): " + (
            f"make one with python -m minirlhf.demo --out {folder}" if not present else
            f"its files ({', '.join(present[:5])}) are no run's; make a run in an empty or new folder"))
    remake = _remake(folder, manifest)
    if manifest["status"] != "finished":
        raise ValueError(f"{folder}: its run did not finish (stages done: {', '.join(manifest['stages']) or 'none'}); "
                         f"re-make it with {remake}")
    for name in _listing(folder):
        if name != MANIFEST and name not in manifest["files"]:
            raise ValueError(f"{folder}/{name} does not belong to the run in {folder} (a file of another run?); "
                             f"move it out of the folder, or re-make the run with {remake} once it is gone")
    for name, digest in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ValueError(f"{path} is missing from the run; re-make it with {remake}")
        if sha256(path) != digest:
            raise ValueError(f"{path} changed since its run wrote it (another run's file, or damaged); "
                             f"re-make the run with {remake}")
    parent_id = manifest.get("parent_run_id")
    parent = read_manifest(os.path.dirname(os.path.abspath(folder))) if parent_id else None
    if parent_id and (parent is None or parent["run_id"] != parent_id):
        raise ValueError(f"{folder} was made from run {parent_id}, which is no longer the run around it; "
                         f"re-make it with {remake}")
    return manifest


def save_policy_info(policy, stage, manifest):
    """The info a policy checkpoint carries: its stage, its Sampling, the run's id and seed."""
    return {"stage": stage, "sampling": vars(policy.sampling), "run_id": manifest["run_id"],
            "seed": manifest["seed"]}


def _checked_info(folder, name, info, manifest, build):
    """build(info) (the Sampling or the RewardModel the info of checkpoint `name` describes), after checking
    that the checkpoint is the run's own (its run_id); ValueError naming the file otherwise."""
    path = os.path.join(folder, name)
    if info.get("run_id", manifest.get("run_id")) != manifest.get("run_id"):
        raise ValueError(f"{path} belongs to run {info['run_id']}, not to the run {manifest.get('run_id')} of its "
                         f"folder; re-make the run with {_remake(folder, manifest)}")
    try:
        return build(info)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its info is unreadable ({type(e).__name__}: {e})") from None


def load_run(folder, model_cfg=None):
    """The SFT policy, the reward model (with its normalisation) and the prompt split of a finished demo
    run, for the experiments in demos/ to start from. model_cfg: the architecture the caller needs."""
    manifest = open_run(folder)
    missing = [f for f in ("sft.npz", "reward.npz", "split.json") if f not in manifest["files"]]
    if missing:
        raise ValueError(f"{folder}: its run has no {', '.join(missing)}: not a demo run (make one with "
                         f"python -m minirlhf.demo --out DIR)")
    sft, cfg, info = load_checkpoint(os.path.join(folder, "sft.npz"), model_cfg, expect_extra=())
    sampling = _checked_info(folder, "sft.npz", info, manifest, lambda i: tf.Sampling(**i["sampling"]))
    rm_params, _, rm_info = load_checkpoint(os.path.join(folder, "reward.npz"), cfg, expect_extra={"head.w", "head.b"})
    reward_model = _checked_info(folder, "reward.npz", rm_info, manifest,
                                 lambda i: RewardModel(rm_params, cfg, gain=i["gain"], bias=i["bias"]))
    path = os.path.join(folder, "split.json")
    try:
        with open(path) as f:
            split = json.load(f)
        prompts = {part: [get_prompt(t) for t in split[part]] for part in ("train", "val")}
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not the run's prompt split ({type(e).__name__}: {e})") from None
    return {"sft": tf.Policy(sft, cfg, sampling), "manifest": manifest, "reward_model": reward_model,
            "train_prompts": prompts["train"], "val_prompts": prompts["val"]}
