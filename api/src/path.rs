//! The data API's request paths (`API.md` section 1), parsed once into typed parts.
//!
//! A path is read from the wire exactly once: split on `/` *before* percent-decoding, every
//! segment decoded on its own, and what does not parse is refused (dot segments, plain or
//! encoded; backslashes; empty segments; control characters; malformed escapes; invalid
//! UTF-8; over-long paths). Every later step works on the typed [`DataPath`], and whatever is
//! sent onwards is built from it by [`DataPath::encode`], percent-encoding each segment. No
//! component ever forwards, joins or re-reads a raw path: that is how, in the first wave, a
//! tenant's `..\..\B` reached another tenant's database through the gateway's HTTP client,
//! which normalised the path the gateway had authorised.
//!
//! The gateway and the datanode parse with the same function, so a path means the same
//! database, collection and document on both sides.

use std::fmt;

use crate::error::ApiError;
use crate::limits::{MAX_ID_BYTES, validate_index_name, validate_name};

/// Longest request path accepted, in bytes (before decoding).
pub const MAX_PATH_BYTES: usize = 4096;

const PREFIX: &str = "/v1/databases/";

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// Well formed, but no operation of the API lives there (404 `NotFound`).
    NoSuchEndpoint,
    /// Not a path this API accepts at all (400 `BadRequest`); the message says what is wrong.
    Invalid(String),
}

impl From<PathError> for ApiError {
    fn from(e: PathError) -> ApiError {
        match e {
            PathError::NoSuchEndpoint => ApiError::not_found("no such endpoint"),
            PathError::Invalid(why) => ApiError::bad_request(format!("invalid request path: {why}")),
        }
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A database name that follows [`validate_name`].
    DbName
);
name_type!(
    /// A collection name that follows [`validate_name`].
    CollName
);
name_type!(
    /// An index name that follows [`validate_index_name`].
    IndexName
);
name_type!(
    /// A document `_id` as one path segment: any UTF-8 text of 1 to [`MAX_ID_BYTES`] bytes
    /// (a `/` sent as `%2F` is part of the id), except `.` and `..`.
    DocId
);

impl DbName {
    pub fn new(name: &str) -> Result<DbName, ApiError> {
        validate_name("database", name)?;
        Ok(DbName(name.to_owned()))
    }
}

impl CollName {
    pub fn new(name: &str) -> Result<CollName, ApiError> {
        validate_name("collection", name)?;
        Ok(CollName(name.to_owned()))
    }
}

impl IndexName {
    pub fn new(name: &str) -> Result<IndexName, ApiError> {
        validate_index_name(name)?;
        Ok(IndexName(name.to_owned()))
    }
}

impl DocId {
    pub fn new(id: &str) -> Result<DocId, ApiError> {
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return Err(ApiError::bad_request(format!("a document id in a path has 1 to {MAX_ID_BYTES} bytes")));
        }
        if id == "." || id == ".." {
            return Err(ApiError::bad_request("a document id cannot be . or .."));
        }
        Ok(DocId(id.to_owned()))
    }
}

/// The operations of the data API, with the collection and names each addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    ListCollections,
    CreateCollection(CollName),
    DropCollection(CollName),
    Insert(CollName),
    Get(CollName, DocId),
    Find(CollName),
    Count(CollName),
    Update(CollName),
    Delete(CollName),
    CreateIndex(CollName),
    ListIndexes(CollName),
    DropIndex(CollName, IndexName),
    /// `DELETE /v1/databases/{db}`: the control plane's, on the datanode's internal API
    /// only. The gateway never accepts it ([`DataPath::parse`] refuses it).
    DropDatabase,
}

/// What an operation does, for authorisation (a `read` user may only read) and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
    Delete,
}

/// A parsed data API request path: the database and the operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataPath {
    pub db: DbName,
    pub op: Op,
}

impl DataPath {
    /// Parses a public request: `method` and the path of the request target (no query).
    pub fn parse(method: &str, path: &str) -> Result<DataPath, PathError> {
        let p = Self::parse_internal(method, path)?;
        if p.op == Op::DropDatabase {
            return Err(PathError::NoSuchEndpoint);
        }
        Ok(p)
    }

    /// Parses a request of the datanode's internal data API: the public operations and
    /// [`Op::DropDatabase`].
    pub fn parse_internal(method: &str, path: &str) -> Result<DataPath, PathError> {
        let rest = path.strip_prefix(PREFIX).ok_or(PathError::NoSuchEndpoint)?;
        let raw = split_raw(path, rest)?;
        let db = DbName::new(&decode(raw[0])?).map_err(invalid)?;
        let coll = |i: usize| -> Result<CollName, PathError> { CollName::new(&decode(raw[i])?).map_err(invalid) };
        let op = match (method, &raw[1..]) {
            ("DELETE", []) => Op::DropDatabase,
            ("GET", ["collections"]) => Op::ListCollections,
            ("PUT", ["collections", _]) => Op::CreateCollection(coll(2)?),
            ("DELETE", ["collections", _]) => Op::DropCollection(coll(2)?),
            ("POST", ["collections", _, "documents"]) => Op::Insert(coll(2)?),
            ("GET", ["collections", _, "documents", _]) => {
                Op::Get(coll(2)?, DocId::new(&decode(raw[4])?).map_err(invalid)?)
            }
            ("POST", ["collections", _, "find"]) => Op::Find(coll(2)?),
            ("POST", ["collections", _, "count"]) => Op::Count(coll(2)?),
            ("POST", ["collections", _, "update"]) => Op::Update(coll(2)?),
            ("POST", ["collections", _, "delete"]) => Op::Delete(coll(2)?),
            ("POST", ["collections", _, "indexes"]) => Op::CreateIndex(coll(2)?),
            ("GET", ["collections", _, "indexes"]) => Op::ListIndexes(coll(2)?),
            ("DELETE", ["collections", _, "indexes", _]) => {
                Op::DropIndex(coll(2)?, IndexName::new(&decode(raw[4])?).map_err(invalid)?)
            }
            _ => return Err(PathError::NoSuchEndpoint),
        };
        Ok(DataPath { db, op })
    }

    /// The collection the operation addresses, if any.
    pub fn coll(&self) -> Option<&CollName> {
        match &self.op {
            Op::ListCollections | Op::DropDatabase => None,
            Op::CreateCollection(c)
            | Op::DropCollection(c)
            | Op::Insert(c)
            | Op::Get(c, _)
            | Op::Find(c)
            | Op::Count(c)
            | Op::Update(c)
            | Op::Delete(c)
            | Op::CreateIndex(c)
            | Op::ListIndexes(c)
            | Op::DropIndex(c, _) => Some(c),
        }
    }

    pub fn access(&self) -> Access {
        match self.op {
            Op::ListCollections | Op::Get(..) | Op::Find(_) | Op::Count(_) | Op::ListIndexes(_) => Access::Read,
            Op::Delete(_) => Access::Delete,
            Op::CreateCollection(_)
            | Op::DropCollection(_)
            | Op::Insert(_)
            | Op::Update(_)
            | Op::CreateIndex(_)
            | Op::DropIndex(..)
            | Op::DropDatabase => Access::Write,
        }
    }

    /// Whether the operation takes a JSON body.
    pub fn has_body(&self) -> bool {
        matches!(
            self.op,
            Op::Insert(_) | Op::Find(_) | Op::Count(_) | Op::Update(_) | Op::Delete(_) | Op::CreateIndex(_)
        )
    }

    pub fn method(&self) -> &'static str {
        match self.op {
            Op::ListCollections | Op::Get(..) | Op::ListIndexes(_) => "GET",
            Op::CreateCollection(_) => "PUT",
            Op::DropCollection(_) | Op::DropIndex(..) | Op::DropDatabase => "DELETE",
            Op::Insert(_) | Op::Find(_) | Op::Count(_) | Op::Update(_) | Op::Delete(_) | Op::CreateIndex(_) => "POST",
        }
    }

    /// A short name of the operation, for metrics and logs.
    pub fn op_name(&self) -> &'static str {
        match self.op {
            Op::ListCollections => "list_collections",
            Op::CreateCollection(_) => "create_collection",
            Op::DropCollection(_) => "drop_collection",
            Op::Insert(_) => "insert",
            Op::Get(..) => "get",
            Op::Find(_) => "find",
            Op::Count(_) => "count",
            Op::Update(_) => "update",
            Op::Delete(_) => "delete",
            Op::CreateIndex(_) => "create_index",
            Op::ListIndexes(_) => "list_indexes",
            Op::DropIndex(..) => "drop_index",
            Op::DropDatabase => "drop_database",
        }
    }

    /// The path of this request, every segment percent-encoded: what the gateway sends to
    /// a datanode. [`DataPath::parse_internal`] of it gives back `self`.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(96);
        out.push_str(PREFIX);
        push_segment(&mut out, &self.db);
        if self.op == Op::DropDatabase {
            return out;
        }
        out.push_str("/collections");
        let Some(coll) = self.coll() else { return out };
        out.push('/');
        push_segment(&mut out, coll);
        let tail: Option<(&str, Option<&str>)> = match &self.op {
            Op::Insert(_) => Some(("documents", None)),
            Op::Get(_, id) => Some(("documents", Some(id))),
            Op::Find(_) => Some(("find", None)),
            Op::Count(_) => Some(("count", None)),
            Op::Update(_) => Some(("update", None)),
            Op::Delete(_) => Some(("delete", None)),
            Op::CreateIndex(_) | Op::ListIndexes(_) => Some(("indexes", None)),
            Op::DropIndex(_, name) => Some(("indexes", Some(name))),
            _ => None,
        };
        if let Some((what, last)) = tail {
            out.push('/');
            out.push_str(what);
            if let Some(last) = last {
                out.push('/');
                push_segment(&mut out, last);
            }
        }
        out
    }
}

/// The database a request path names (its first segment after `/v1/databases/`, decoded),
/// whether or not the rest parses: who may be told that the rest does not parse.
pub fn addressed_database(path: &str) -> Option<String> {
    let rest = path.strip_prefix(PREFIX)?;
    let first = rest.split('/').next()?;
    decode(first).ok()
}

fn invalid(e: ApiError) -> PathError {
    PathError::Invalid(e.message)
}

/// Splits the part of `path` after the prefix into raw (still encoded) segments, refusing
/// what no client of this API sends.
fn split_raw<'a>(path: &str, rest: &'a str) -> Result<Vec<&'a str>, PathError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::Invalid(format!("longer than {MAX_PATH_BYTES} bytes")));
    }
    for b in path.bytes() {
        if b == b'\\' {
            return Err(PathError::Invalid("a backslash is not allowed; encode it as %5C".into()));
        }
        if !(0x21..=0x7e).contains(&b) {
            return Err(PathError::Invalid(
                "control characters, spaces and non-ASCII bytes must be percent-encoded".into(),
            ));
        }
    }
    let raw: Vec<&str> = rest.split('/').collect();
    for seg in &raw {
        if seg.is_empty() {
            return Err(PathError::Invalid("empty path segment".into()));
        }
        if *seg == "." || *seg == ".." {
            return Err(PathError::Invalid("dot segments are not allowed".into()));
        }
    }
    if raw.len() > 5 {
        return Err(PathError::NoSuchEndpoint);
    }
    Ok(raw)
}

/// Percent-decodes one segment: every `%` starts two hex digits, and the result is UTF-8.
fn decode(seg: &str) -> Result<String, PathError> {
    let bytes = seg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
            match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(hi), Some(lo)) => out.push((hi * 16 + lo) as u8),
                _ => return Err(PathError::Invalid("a % must be followed by two hex digits".into())),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PathError::Invalid("a path segment is not UTF-8 once decoded".into()))
}

/// Appends `seg` percent-encoded: everything but RFC 3986's unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) becomes `%XX`, so the segment can hold no separator, no dot
/// segment (`.` and `..` are refused as names and ids) and nothing a URL parser rewrites.
fn push_segment(out: &mut String, seg: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in seg.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(method: &str, path: &str) -> DataPath {
        DataPath::parse(method, path).unwrap_or_else(|e| panic!("{method} {path}: {e:?}"))
    }

    fn refused(method: &str, path: &str) -> PathError {
        DataPath::parse(method, path).expect_err(path)
    }

    #[test]
    fn every_operation_of_the_contract_parses() {
        let db = DbName::new("shop").unwrap();
        let c = CollName::new("orders").unwrap();
        let cases = [
            ("GET", "/v1/databases/shop/collections", Op::ListCollections, Access::Read),
            ("PUT", "/v1/databases/shop/collections/orders", Op::CreateCollection(c.clone()), Access::Write),
            ("DELETE", "/v1/databases/shop/collections/orders", Op::DropCollection(c.clone()), Access::Write),
            ("POST", "/v1/databases/shop/collections/orders/documents", Op::Insert(c.clone()), Access::Write),
            (
                "GET",
                "/v1/databases/shop/collections/orders/documents/7",
                Op::Get(c.clone(), DocId::new("7").unwrap()),
                Access::Read,
            ),
            ("POST", "/v1/databases/shop/collections/orders/find", Op::Find(c.clone()), Access::Read),
            ("POST", "/v1/databases/shop/collections/orders/count", Op::Count(c.clone()), Access::Read),
            ("POST", "/v1/databases/shop/collections/orders/update", Op::Update(c.clone()), Access::Write),
            ("POST", "/v1/databases/shop/collections/orders/delete", Op::Delete(c.clone()), Access::Delete),
            ("POST", "/v1/databases/shop/collections/orders/indexes", Op::CreateIndex(c.clone()), Access::Write),
            ("GET", "/v1/databases/shop/collections/orders/indexes", Op::ListIndexes(c.clone()), Access::Read),
            (
                "DELETE",
                "/v1/databases/shop/collections/orders/indexes/n_1",
                Op::DropIndex(c.clone(), IndexName::new("n_1").unwrap()),
                Access::Write,
            ),
        ];
        for (method, path, op, access) in cases {
            let p = ok(method, path);
            assert_eq!(p, DataPath { db: db.clone(), op }, "{path}");
            assert_eq!(p.access(), access, "{path}");
            assert_eq!(p.method(), method);
            assert_eq!(p.encode(), path, "a canonical path encodes to itself");
        }
    }

    #[test]
    fn dropping_a_database_is_internal_only() {
        assert_eq!(refused("DELETE", "/v1/databases/shop"), PathError::NoSuchEndpoint);
        let p = DataPath::parse_internal("DELETE", "/v1/databases/shop").unwrap();
        assert_eq!(p.op, Op::DropDatabase);
        assert_eq!(p.encode(), "/v1/databases/shop");
    }

    #[test]
    fn tricks_that_reach_another_database_are_refused() {
        let base = "/v1/databases/a/collections/c/documents";
        for path in [
            // The first wave's exploit: backslashes are separators to URL parsers.
            r"/v1/databases/a/collections/c/documents/..\..\..\..\b\collections\x\documents\y",
            &format!("{base}/../../../../b/collections/x/documents/y"),
            &format!("{base}/./x"),
            &format!("{base}/%2e%2e"),
            &format!("{base}/%2E%2e"),
            &format!("{base}/%2e"),
            "/v1/databases/a/collections/%2e%2e/documents/x",
            "/v1/databases/%2e%2e/collections/c/documents/x",
            "/v1/databases/a//collections/c/documents/x",
            "/v1/databases/a/collections/c/documents/x/",
            "/v1/databases/a/collections/c/documents/a%5",
            "/v1/databases/a/collections/c/documents/a%zz",
            "/v1/databases/a/collections/c/documents/%ff",
            "/v1/databases/a/collections/c/documents/a\tb",
            "/v1/databases/a/collections/c/documents/a b",
            "/v1/databases/a/collections/c/documents/\u{e9}",
            "/v1/databases/a%2fb/collections/c/documents/x",
            "/v1/databases/a;b/collections/c/documents/x",
            "/v1/databases/a./collections/c/documents/x",
            "/v1/databases/a%00/collections/c",
        ] {
            assert!(matches!(refused("GET", path), PathError::Invalid(_)), "{path}");
        }
        // Index names of dots alone would be dot segments once sent on.
        for path in ["/v1/databases/a/collections/c/indexes/%2e%2e", "/v1/databases/a/collections/c/indexes/%2E"] {
            assert!(matches!(refused("DELETE", path), PathError::Invalid(_)), "{path}");
        }
        let long = format!("{base}/{}", "x".repeat(MAX_PATH_BYTES));
        assert!(matches!(refused("GET", &long), PathError::Invalid(_)));
    }

    #[test]
    fn unknown_routes_and_methods_are_not_found() {
        for (m, path) in [
            ("GET", "/v1/databases/a/collections/c/documents/x/y"),
            ("GET", "/v1/databases/a/Collections"),
            ("POST", "/v1/databases/a/collections/c/%66ind"),
            ("PATCH", "/v1/databases/a/collections/c"),
            ("GET", "/v1/databases/a/collections/c/documents"),
            ("GET", "/v2/databases/a/collections"),
            ("GET", "/v1/databases"),
        ] {
            assert_eq!(refused(m, path), PathError::NoSuchEndpoint, "{m} {path}");
        }
    }

    #[test]
    fn a_document_id_is_one_decoded_segment() {
        let p = ok("GET", "/v1/databases/a/collections/c/documents/x%2F..%2F..%2Fb");
        assert_eq!(p.db.as_str(), "a");
        assert_eq!(p.op, Op::Get(CollName::new("c").unwrap(), DocId::new("x/../../b").unwrap()));
        assert_eq!(p.encode(), "/v1/databases/a/collections/c/documents/x%2F..%2F..%2Fb");
        // Double encoding is decoded once: the id is the text `%2e%2e`.
        let p = ok("GET", "/v1/databases/a/collections/c/documents/%252e%252e");
        assert_eq!(p.op, Op::Get(CollName::new("c").unwrap(), DocId::new("%2e%2e").unwrap()));
        // `;` and a backslash sent encoded are part of the id.
        let p = ok("GET", "/v1/databases/a/collections/c/documents/x;y=1%5C");
        assert_eq!(p.op, Op::Get(CollName::new("c").unwrap(), DocId::new("x;y=1\\").unwrap()));
        assert_eq!(p.encode(), "/v1/databases/a/collections/c/documents/x%3By%3D1%5C");
        // Names may be sent encoded; they are sent on in their plain form.
        assert_eq!(ok("GET", "/v1/databases/sh%6Fp/collections").encode(), "/v1/databases/shop/collections");
    }

    fn arb_segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("c".to_owned()),
            Just("collections".to_owned()),
            Just("documents".to_owned()),
            Just("indexes".to_owned()),
            Just("find".to_owned()),
            Just("..".to_owned()),
            Just(".".to_owned()),
            Just("%2e%2e".to_owned()),
            Just("%2E.".to_owned()),
            Just("%252e%252e".to_owned()),
            Just("%2f".to_owned()),
            Just("%5c".to_owned()),
            Just("\\".to_owned()),
            Just("".to_owned()),
            Just(";x=1".to_owned()),
            Just("%00".to_owned()),
            Just("%".to_owned()),
            Just("b%2F..%2Fa".to_owned()),
            "[a-zA-Z0-9._~%;=\\\\-]{1,12}",
            any::<String>(),
        ]
    }

    fn arb_path() -> impl Strategy<Value = String> {
        (prop::collection::vec(arb_segment(), 0..7), prop::bool::ANY).prop_map(|(segs, absolute)| {
            let tail = segs.join(if absolute { "/" } else { "\\" });
            format!("/v1/databases/a/{tail}")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Whatever a client sends, a path that parses names one database, and what the
        /// gateway sends on (the encoded path) parses, on the datanode, to the same request.
        #[test]
        fn what_is_forwarded_means_what_was_authorised(
            method in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("DELETE")],
            path in arb_path(),
        ) {
            if let Ok(p) = DataPath::parse(method, &path) {
                let encoded = p.encode();
                let back = DataPath::parse_internal(p.method(), &encoded).expect("an encoded path parses");
                prop_assert_eq!(&back, &p);
                // A path under database `a` never addresses another database.
                prop_assert_eq!(p.db.as_str(), "a");
                prop_assert!(encoded.split('/').all(|seg| seg != "." && seg != ".."), "{}", encoded);
                prop_assert!(!encoded.contains('\\'));
            }
        }

        #[test]
        fn any_id_round_trips(id in any::<String>()) {
            if let Ok(id) = DocId::new(&id) {
                let p = DataPath { db: DbName::new("a").unwrap(), op: Op::Get(CollName::new("c").unwrap(), id) };
                prop_assert_eq!(DataPath::parse("GET", &p.encode()).unwrap(), p);
            }
        }
    }
}
