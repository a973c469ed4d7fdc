"""`python -m llmqgen ...`: what launchers run, e.g. `torchrun --nproc-per-node 2 -m llmqgen run --plan P`."""
from .cli import main

main()
