"""Tables, plots and reports built from run records."""
