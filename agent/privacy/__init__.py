"""What leaves a site, and the record of it: the privacy ledger (and, later, DP accounting)."""
