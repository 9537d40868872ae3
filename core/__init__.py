"""What every domain package shares, in four layers: ``serving`` (the server kit), ``models``
(loading and text generation), ``rewards`` (reward protocol, mix, verl/TRL adapters) and
``training`` (the GRPO recipe); ``tasks`` runs the task a composed config names."""
