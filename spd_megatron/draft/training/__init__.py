"""Training the Pipeline Draft Module against a frozen target (docs/SPD.md section 3)."""
