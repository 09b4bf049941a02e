"""The toolkit's commands. Each module has ``main(argv=None) -> int`` and is a console script
(``cmunet-<name>``, see setup.cfg); ``launch/<name>.py`` and ``tools/shard.py`` call the same
``main`` so that ``python launch/pretrain.py`` and ``deepspeed launch/pretrain.py`` keep working."""
