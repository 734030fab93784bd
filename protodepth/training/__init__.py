"""The trainer's parts; `protodepth.train.train` composes them into one loop.

docs/architecture.md maps every module here and the rule it owns.
"""
