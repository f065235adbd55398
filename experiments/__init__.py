"""The `moelab` command line, sweeps, paper reproductions, validation reports and plots."""
