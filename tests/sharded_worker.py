"""Run under torchrun by tests/test_fsdp.py: several `tunelab train ...` commands one after another in
the same processes (one launch instead of one per run). argv[1]: a JSON list of argument lists. The
process group is started here, once: a run leaves a group it did not start up for the next."""

import json
import sys

import torch.distributed as dist

from tunelab.cli import main

dist.init_process_group("gloo")
try:
    for args in json.loads(sys.argv[1]):
        code = main(args)
        if code:
            sys.exit(code)
finally:
    dist.destroy_process_group()
