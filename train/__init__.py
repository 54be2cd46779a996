"""Training jobs, each run as a process of its own (`python -m tuneloop.train.run`): reward model,
DPO, KTO, SFT and online RL on TRL and PEFT, the gate, and the offline demo model."""
