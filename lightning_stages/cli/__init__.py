"""The command line (``lightning-stages validate | show | compare``) and the LightningCLI glue, on top of both wings."""

from lightning_stages.cli.main import main
from lightning_stages.cli.stages_lightning_cli import StagesLightningCLI

__all__ = ["StagesLightningCLI", "main"]
