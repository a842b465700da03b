"""`python train.py`: pre-training, SFT or from-scratch training of an AnLLM (`anjax.cli.train`)."""

from anjax import cli
from anjax.cli.train import main

if __name__ == "__main__":
    cli.run(main)
