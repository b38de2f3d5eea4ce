"""The benchmark suites: inference, features, logging, scaling, e2e."""
