"""
What every script shares: the command line (nanoGPT-style but importable and strict), the device and the precision.

    python train.py [config_file.py] --key=value --key value ...

A config is a dataclass; each flag names a field and is parsed to the field's type (ints, floats, bools,
strings). Unknown keys, wrong types and files that don't exist are a `UserError`: the scripts print it as
one line and exit 1, with no traceback.
"""
import ast
import contextlib
import dataclasses
import difflib
import inspect
import math
import numbers
import re
import sys

import torch


class UserError(ValueError):
    """A mistake the user can fix. The CLIs print it as one line; library callers get the exception."""


def _convert(key, raw, typ):
    if typ is bool:
        low = str(raw).lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise UserError(f"--{key} expects True or False, got {raw!r}")
    if typ is str:
        return str(raw)
    try:
        value = ast.literal_eval(raw) if isinstance(raw, str) else raw
    except (ValueError, SyntaxError):
        value = raw
    if typ is float and not isinstance(value, bool):
        try:
            value = float(value)  # an int, or nan and inf, which literal_eval leaves as text
        except OverflowError:
            value = math.inf
        except (TypeError, ValueError):
            raise UserError(f"--{key} expects float, got {raw!r}") from None
        if not math.isfinite(value):
            raise UserError(f"--{key}={raw} must be a finite number")
    if type(value) is not typ:
        raise UserError(f"--{key} expects {typ.__name__}, got {raw!r}")
    return value


NANOGPT_FLAGS = {"max_new_tokens": "length", "top_k": "top_p"}  # nanoGPT's sample.py flags, and the nearest here


def flag_help(config):
    """--help: every flag with its default and the comment its field has in the config's source."""
    notes = {}
    try:
        for line in inspect.getsource(type(config)).splitlines():
            name, colon, rest = line.strip().partition(":")
            if colon and name.isidentifier() and "  # " in rest:
                notes[name] = rest.split("  # ", 1)[1]
    except (OSError, TypeError):  # no source (a frozen build): the flags alone
        pass
    lines = [f"  --{f.name}={getattr(config, f.name)!r}" + (f"  # {notes[f.name]}" if f.name in notes else "")
             for f in dataclasses.fields(config)]
    return "flags (default), as --key=value or --key value:\n" + "\n".join(lines)


def parse_args(config, argv=None):
    """Apply `argv` to the dataclass `config` in place; return the set of keys the user set."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f.type for f in dataclasses.fields(config)}
    overrides = []  # (key, raw value, where) in the order given
    # a value may start with --, as a prompt may (--start "--Hello"), unless it names a flag, or nearly does
    # (--out_dir --devcie=cpu is a missing value and a typo, not an out_dir named "--devcie=cpu")
    named = lambda name: name in fields or name in NANOGPT_FLAGS or difflib.get_close_matches(name, fields, 1, 0.8)
    is_flag = lambda arg: arg in ("-h", "--help") or arg.startswith("--") and bool(named(arg[2:].partition("=")[0]))
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(flag_help(config))
            sys.exit(0)
        if not arg.startswith("--"):  # a nanoGPT-style config file of `key = value` lines
            namespace = {}
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise UserError(f"cannot read config file {arg}: {e.strerror}")
            try:
                exec(source, {}, namespace)
            except Exception as e:  # a config file is Python: any error in it is the file's, not the program's
                raise UserError(f"config file {arg}: {type(e).__name__}: {e}")
            overrides += [(k, v, f" in config file {arg}") for k, v in namespace.items()
                          if not k.startswith("_") and not inspect.ismodule(v)]
            i += 1
            continue
        key, eq, raw = arg[2:].partition("=")
        if not eq:  # --key value
            if i + 1 < len(argv) and argv[i + 1] in ("-h", "--help"):
                print(flag_help(config))
                sys.exit(0)
            if i + 1 >= len(argv) or is_flag(argv[i + 1]):  # a flag with no value before the next flag
                raise UserError(f"--{key} needs a value, e.g. --{key}=..."
                                + (f", before {argv[i + 1]}" if i + 1 < len(argv) else ""))
            raw = argv[i + 1]
            i += 1
        overrides.append((key, raw, ""))
        i += 1
    for key, raw, where in overrides:
        if key not in fields:
            near = NANOGPT_FLAGS.get(key) or next(iter(difflib.get_close_matches(key, fields, 1)), None)
            hint = f"did you mean --{near}? " if near in fields else ""
            what = f"unknown key {key}{where}" if where else f"unknown flag --{key}"
            raise UserError(f"{what}; {hint}the flags are: " + ", ".join(fields))
        setattr(config, key, _convert(key, raw, fields[key]))
    return {key for key, _, _ in overrides}


def require(checks, error=UserError):
    """Raise `error` with the message of the first (ok, message) pair that is not ok."""
    for ok, message in checks:
        if not ok:
            raise error(message)


def run_cli(main):
    """Run `main()`, turning a UserError, or memory that runs out, into one line on stderr and exit code 1, and
    Ctrl-C into one line and exit code 130 (train.py saves what it can first). A console that cannot show a
    character prints '?' for it."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:  # CUDA's torch.OutOfMemoryError; CPU and MPS: a RuntimeError saying so
        out_of_memory = isinstance(e, (MemoryError, torch.OutOfMemoryError)) or re.search(
            r"can't allocate memory|out of memory|size calculation overflowed|multiplication overflow", str(e))
        if not out_of_memory:
            raise
        print("error: out of memory; use a smaller batch, fewer or shorter samples or texts, a smaller model, or "
              "another --device", file=sys.stderr)
        sys.exit(1)


def seed_check(seed, name="--seed"):
    """(ok, one-line message) for a seed: PyTorch's CPU generator keeps 32 bits of one, so two seeds 2**32 apart
    would give the same run."""
    return (isinstance(seed, numbers.Integral) and 0 <= seed < 2 ** 32,
            f"{name}={seed!r} must be an integer in [0, 2**32): PyTorch's CPU generator keeps 32 bits of a seed")


def pick_device(name):
    """'auto' -> cuda, mps or cpu; an explicit device that isn't there is a UserError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cuda", "mps", "cpu") or ":" in name and not (kind == "cuda" and index.isascii() and
                                                                  index.isdigit()):
        raise UserError(f"--device={name} is not one of auto, cuda, cuda:N, mps, cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name} but no CUDA GPU is visible; use --device=cpu (or auto)")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device={name} but {torch.cuda.device_count()} CUDA GPUs are visible (cuda:0 ...)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={name} but MPS is not available; use --device=cpu (or auto)")
    return name


def autocast_context(device, dtype):
    """(context, dtype name): bf16 autocast on CUDA, plain fp32 elsewhere, unless --dtype says otherwise."""
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype={dtype} is not supported; use float32 or bfloat16")
    if dtype == "float32":
        return contextlib.nullcontext(), dtype
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16), dtype


def attention_backends(device):
    """The attention kernels every pass uses on CUDA, training, eval and sampling alike: flash (no mask),
    memory-efficient (an additive mask) or plain math. Left to choose, PyTorch may pick one whose set-up for each
    new shape costs tens of ms; elsewhere there is one kernel and nothing to pin."""
    if not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def to_device(x, device):
    """A host tensor on `device`; on CUDA through pinned memory, so that the copy never waits for the GPU."""
    return x.pin_memory().to(device, non_blocking=True) if str(device).startswith("cuda") else x.to(device)
