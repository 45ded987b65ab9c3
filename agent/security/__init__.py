"""Identities and trust: the federation PKI, broker configuration, message signatures."""
