"""Auditing a model over a dataset (SpRAy): `audit` clusters the stored maps of a batch run per
class and flags the clusters whose relevance sits at the border or in a small fixed region."""

from cnnscan.spray.run import Audit, audit

__all__ = ["Audit", "audit"]
