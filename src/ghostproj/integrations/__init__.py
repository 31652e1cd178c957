"""Attribution inside the training loops people already run."""
