"""
What every script shares: the command line (nanoGPT-style but importable and strict), the device and the precision.

    python train.py [config_file.py] --key=value --key value ...

A config is a dataclass; each flag names a field and is parsed to the field's type (int, float, bool, str).
Unknown keys, wrong types and files that don't exist are a `UserError`: the scripts print it as one line and
exit 1, with no traceback.
"""
import contextlib
import difflib
import inspect
import re
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class UserError(ValueError):
    """A mistake the user can fix. The CLIs print it as one line; library callers get the exception."""


NANOGPT_FLAGS = {"max_new_tokens": "length", "top_k": "top_p"}  # nanoGPT's sample.py flags, and the nearest here


def parse_args(config, argv=None):
    """Apply `argv` (config files, --key=value, --key value) to the dataclass `config` in place; return the set
    of keys the user set. --help lists every flag with its default and its field's comment."""
    argv = sys.argv[1:] if argv is None else argv
    fields = type(config).__annotations__  # {name: type}
    if "-h" in argv or "--help" in argv:
        notes = dict(re.findall(r"(\w+):.*?(  # .*)", inspect.getsource(type(config))))
        print("flags (default), as --key=value or --key value:\n" + "\n".join(
            f"  --{k}={getattr(config, k)!r}{notes.get(k, '')}" for k in fields))
        sys.exit(0)
    given, args = {}, iter(argv)  # {key: (text, what an error calls it)}
    for arg in args:
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--"):  # a nanoGPT config file of `key = value` lines
            namespace = {}
            try:
                exec(open(arg).read(), {}, namespace)
            except Exception as e:  # a config file is Python: any error in it is the file's
                raise UserError(f"config file {arg}: {type(e).__name__}: {e}")
            given |= {k: (str(v), f"key {k} in config file {arg}") for k, v in namespace.items()}
            continue
        if not eq:  # --key value, where the value may start with --, as a prompt may, unless it names a flag or
            text = next(args, None)  # nearly does (--out_dir --devcie=cpu is a missing value and a typo)
            if text is None or text.startswith("--") and difflib.get_close_matches(
                    text[2:].partition("=")[0], fields, 1, 0.8):
                raise UserError(f"--{key} needs a value, e.g. --{key}=...{f', before {text}' if text else ''}")
        given[key] = text, f"flag --{key}"
    for key, (text, what) in given.items():
        typ = fields.get(key)
        if typ is None:
            near = difflib.get_close_matches(NANOGPT_FLAGS.get(key, key), fields, 1)
            hint = f"did you mean --{near[0]}? " if near else ""
            raise UserError(f"unknown {what}; {hint}the flags are: {', '.join(fields)}")
        try:
            value = {"true": True, "false": False}[text.lower()] if typ is bool else typ(text)
        except (KeyError, ValueError):
            raise UserError(f"--{key} expects {typ.__name__}, got {text!r}")
        setattr(config, key, value)
    return set(given)


def require(checks):
    """Raise a UserError with the message of the first (ok, message) pair that is not ok."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def run_cli(main):
    """Run `main()`, turning a UserError, or memory that runs out, into one line on stderr and exit code 1, and
    Ctrl-C into one line and exit code 130 (train.py saves what it can first). A console that cannot show a
    character prints '?' for it."""
    if hasattr(sys.stdout, "reconfigure"):  # (stderr replaces them already)
        sys.stdout.reconfigure(errors="replace")
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (UserError, MemoryError, RuntimeError) as e:  # CUDA's OutOfMemoryError is a RuntimeError saying so
        if isinstance(e, RuntimeError) and not re.search(
                r"can't allocate memory|out of memory|size calculation overflowed|multiplication overflow", str(e)):
            raise
        print(f"error: {e}" if isinstance(e, UserError) else "error: out of memory; use a smaller batch, fewer or "
              "shorter samples or texts, a smaller model, or another --device", file=sys.stderr)
        sys.exit(1)


def pick_device(name):
    """'auto' -> cuda, mps or cpu; a device this machine does not have is a UserError."""
    cuda, mps = torch.cuda.device_count(), torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    gpu = re.fullmatch(r"cuda(:\d+)?", name) and int(name[5:] or 0) < cuda  # cuda:N, the N-th GPU
    if not (name == "cpu" or name == "mps" and mps or gpu):
        raise UserError(f"--device={name} is not a device of this machine: it has cpu{', mps' if mps else ''} and "
                        f"{cuda} CUDA GPUs (cuda, cuda:N); or use auto")
    return name


def to_device(x, device):
    """A host tensor on `device`; on CUDA through pinned memory, so that the copy does not wait for the GPU's queue."""
    return x.pin_memory().to(device, non_blocking=True) if str(device).startswith("cuda") else x.to(device)


def autocast_context(device, dtype):
    """(context, dtype name): bf16 autocast on a CUDA GPU with bf16 in hardware (compute capability 8.0, Ampere, or
    newer; older ones only emulate it), plain fp32 elsewhere, unless --dtype says otherwise."""
    if dtype == "auto":
        native = device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 0)
        dtype = "bfloat16" if native else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype={dtype} is not supported; use float32 or bfloat16")
    return torch.autocast(device.split(":")[0], torch.bfloat16, enabled=dtype == "bfloat16"), dtype


def attention_backends(device):
    """The attention kernels every pass uses on CUDA: flash (no mask), memory-efficient (an additive mask) or plain
    math. Left to choose, PyTorch may pick one whose set-up for each new shape costs tens of ms."""
    if str(device).startswith("cuda"):
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    return contextlib.nullcontext()

