"""What the scripts' command lines share: a parser whose help is the script's own docstring and
whose errors are one line, and the argparse types that check each argument where it enters.

    p = cli.parser(__doc__)        # description: the first paragraph; epilog: the rest, as written
    p.add_argument("--steps", type=cli.positive_int, default=600)
    p.add_argument("--out", type=cli.out_file)      # a file to write, in a folder that exists

A refused value ends as "error: argument --steps: pass a whole number >= 1, not '0'." and exit
status 1, as the scripts' other errors. Output folders are created with their parents when the
script writes; an output file's folder must exist. Nothing here imports torch (infer_onnx.py).
"""

import argparse
import math
import os
import re
import sys
import tempfile


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # -1e-3 and -inf are values, to be refused by the type in a sentence (argparse's own pattern
        # takes only -1 and -.5, and says "expected one argument" for the others).
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf$)")

    def error(self, message):
        """One line, "error: ..." and exit status 1, like the scripts' own errors (--help shows the usage)."""
        sys.exit(f"error: {message}.")


def parser(doc):
    """A Parser showing the script's docstring: its first paragraph above the options, the rest
    (usage examples, what it writes) below them, with the docstring's line breaks kept."""
    first, _, rest = doc.partition("\n\n")
    return Parser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)


def check(parse, test, wanted):
    """An argparse type: parse(text), refused with "pass WANTED, not TEXT" unless test(value)."""
    def type_(text):
        try:
            value = parse(text)
            ok = value is not None and test(value)
        except (ValueError, OverflowError, argparse.ArgumentTypeError):
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"pass {wanted}, not {text!r}")
        return value
    return type_


def _whole(text):
    try:
        return int(text)
    except ValueError:
        value = float(text)                     # 2e6 is a whole number too
        return int(value) if value.is_integer() else None


def whole(minimum):
    """An argparse type: a whole number >= minimum, written as 600 or 2e6."""
    return check(_whole, lambda v: v >= minimum, f"a whole number >= {minimum}")


positive_int = whole(1)
count = whole(0)
positive = check(float, lambda v: 0 < v < math.inf, "a number > 0")
fraction = check(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
existing_file = check(str, os.path.isfile, "a file that exists")
existing_path = check(str, os.path.exists, "a file or folder that exists")


def device(text):
    """An argparse type: cpu, or cuda (cuda:N) where there is such a GPU."""
    import torch                                # here: infer_onnx.py imports this file without torch
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ("cpu", "cuda") or d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"pass cpu{' or cuda' * torch.cuda.is_available()}, not {text!r}")
    return text


def _writable(folder, text):
    """Create and delete a nameless file in `folder`: root passes os.access even where /proc refuses."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written ({e.strerror}); pass a place you can write to")
    return text


def out_file(text):
    """An argparse type: a file to write, in a folder that exists and takes new files."""
    if not text or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"pass a file path, not {'the folder ' * bool(text)}{text!r}")
    folder = os.path.dirname(text) or "."
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist; create it or pass another path")
    return _writable(folder, text)


def out_folder(text):
    """An argparse type: a folder to write, created with its parents (by the script, when it writes)."""
    if not text or os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"pass a folder, not {'the file ' * bool(text)}{text!r}")
    parent = text
    while not os.path.exists(parent):
        parent = os.path.dirname(parent.rstrip("/")) or "."
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be made: {parent!r} is a file; pass another folder")
    return _writable(parent, text)
