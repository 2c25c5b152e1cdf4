//! IP addresses and subnets as written in specs, with messages that say what a
//! valid one looks like.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::ops::Deref;

use ipnet::IpNet;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 or IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address(pub IpAddr);

/// A subnet in CIDR form whose host bits are zero, e.g. `10.20.1.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet(pub IpNet);

impl Deref for Address {
    type Target = IpAddr;
    fn deref(&self) -> &IpAddr {
        &self.0
    }
}

impl Deref for Subnet {
    type Target = IpNet;
    fn deref(&self) -> &IpNet {
        &self.0
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl Serialize for Subnet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(Address).map_err(|_| {
            serde::de::Error::custom(format_args!(
                "\"{text}\" is not an IP address; write one like `192.0.2.10` or `2001:db8::10`"
            ))
        })
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let net: IpNet = text.parse().map_err(|_| {
            serde::de::Error::custom(format_args!(
                "\"{text}\" is not a subnet; write one like `10.20.1.0/24` or `fd00:20:1::/64`"
            ))
        })?;
        if net.trunc() != net {
            return Err(serde::de::Error::custom(format_args!(
                "subnet \"{text}\" has host bits set; did you mean `{}`?",
                net.trunc()
            )));
        }
        Ok(Subnet(net))
    }
}

impl JsonSchema for Address {
    fn schema_name() -> Cow<'static, str> {
        "Address".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "An IPv4 or IPv6 address.",
            "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}],
            "examples": ["192.0.2.10", "2001:db8::10"]
        })
    }
}

impl JsonSchema for Subnet {
    fn schema_name() -> Cow<'static, str> {
        "Subnet".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A subnet in CIDR form, host bits zero.",
            "pattern": r"^[0-9A-Fa-f:.]+/[0-9]{1,3}$",
            "examples": ["10.20.1.0/24", "fd00:20:1::/64"]
        })
    }
}
