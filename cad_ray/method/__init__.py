"""The method, without Ray: concepts and objectives, scopes, the CAD estimator, the estimators that validate it,
and the edits that use its scores."""
