"""Secure aggregation: the initiator learns the sum of the sites' inputs, never one of them.

`crypto` holds the primitives, `shamir` the secret sharing, `site` what a node derives
for a round, `summable` which operations can be summed and how, `rounds` the protocol's
rounds as operations. The messages are in protocol/secagg.py.
"""
