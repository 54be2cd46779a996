"""Training jobs: demo model, and (later) SFT, reward model, DPO, KTO, RL."""
