"""The loop: training cycles (snapshot, jobs, gate, promotion, rollback) and the scheduler that
starts them. Jobs run as processes of their own (`tuneloop.train.run`); this layer only starts
them, follows them and records what they made."""
