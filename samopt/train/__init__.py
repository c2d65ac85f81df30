"""The samopt application: data, models and training helpers built on the library."""
