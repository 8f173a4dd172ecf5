"""Layer 1: serializing device state through visitors and VMState schemas."""
