"""What a run is: its options (one declaration each), the saved run spec, and the checks of what a user gives (their code, read without importing it; data files; commands; sweeps)."""
