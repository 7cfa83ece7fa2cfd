"""Names of the user attributes hpsearch keeps on a study, shared by modules on every floor (free of imports)."""

SPEC_ATTR = "hpsearch:spec"  # the study file's content, as JSON: a study without it is not hpsearch's
