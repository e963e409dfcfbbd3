"""Every file vlora reads or writes goes through this package."""
