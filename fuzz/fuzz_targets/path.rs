//! A method and a request path: a path that parses names one database, and what the gateway
//! sends on (the encoded path) parses, on the datanode, to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus_api::path::DataPath;

fuzz_target!(|data: &[u8]| {
    let Some((m, rest)) = data.split_first() else { return };
    let method = ["GET", "PUT", "POST", "DELETE"][(*m % 4) as usize];
    let Ok(path) = std::str::from_utf8(rest) else { return };
    for parsed in [DataPath::parse(method, path), DataPath::parse_internal(method, path)] {
        if let Ok(p) = parsed {
            let encoded = p.encode();
            assert!(encoded.split('/').all(|seg| seg != "." && seg != "..") && !encoded.contains('\\'), "{encoded}");
            assert_eq!(DataPath::parse_internal(p.method(), &encoded).as_ref(), Ok(&p), "{path:?} -> {encoded:?}");
        }
    }
});
