"""What runs on a GPU machine: one long-lived agent per GPU (``python -m agent``)."""
