"""fundus_lab: self-supervised vision-language learning on retinal fundus photographs."""

__version__ = "0.1.0"
