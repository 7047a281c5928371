"""ages stage."""
