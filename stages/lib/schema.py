"""The ULB credit-card file's columns."""

FEATURES: tuple[str, ...] = ("Time", *(f"V{i}" for i in range(1, 29)), "Amount")
TARGET = "Class"
COLUMNS: tuple[str, ...] = (*FEATURES, TARGET)
