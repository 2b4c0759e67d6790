"""Argument types for the command lines (the demo, the benchmark, the scripts in demos/): each rejects what
its flag cannot take (NaN, inf, negatives, zero where a count is needed; a folder, a missing folder or nothing
where a file is to be written; a file where a run folder is read) with argparse's usage error, so a bad flag
stops the program before any work is done."""
import argparse
import math
import os


def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_int(text):
    """An integer >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text):
    """An integer >= 0 (a seed)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text):
    """A finite number > 0."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text):
    """A finite number >= 0."""
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def group_size(text):
    """An integer >= 2: completions per prompt, where each is judged against the others of its group."""
    value = _number(text, int)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (a group of one has nothing to compare with), "
                                         f"got {text}")
    return value


def fraction(text):
    """A number in (0, 1)."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (exclusive), got {text}")
    return value


def writable_file(path):
    """path, if it names a file that can be written: not empty, not a folder, in a folder that exists and
    is writable. Else ValueError saying which (checked before the work whose result it will hold)."""
    if path.strip() == "" or os.path.isdir(path):
        raise ValueError(f"{path!r} must name a file, not {'a folder' if path.strip() else 'nothing'}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{path!r}: {folder} is a file, not a folder" if os.path.exists(folder)
                         else f"{path!r}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{path!r}: the folder {folder} is not writable")
    return path


def output_file(path):
    """writable_file as an argument type (--json, --plot): its problem is a usage error, before any work."""
    try:
        return writable_file(path)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def existing_file(path):
    """A path naming a file that exists (an input: --port)."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path!r} is {'a folder' if os.path.isdir(path) else 'no such file'}; "
                                         f"expected a file")
    return path


def run_folder(path):
    """A run folder to read (--run): a folder, or a path where one can be made; not empty, not a file."""
    if path.strip() == "":
        raise argparse.ArgumentTypeError("the run folder is an empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a file, not a run folder")
    return path


def output_folder(path):
    """A folder to write into (--out of the fixtures): one that exists or can be made, and is writable."""
    from .runs import check_folder
    try:
        check_folder(path)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def apply_preset(args, preset):
    """Fill every flag left unset (None) from preset: a flag the user typed always wins over --quick."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args
