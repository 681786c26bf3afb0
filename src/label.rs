//! Labels spelled once: an enum whose every variant has one kebab-case name, used alike by
//! the report, the metrics and the trail.

/// Declares a fieldless enum with its kebab-case label per variant: `as_str`, `ALL` (every
/// variant, in order), `Display` and `Serialize` all give that one spelling.
macro_rules! labels {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$( $name::$variant, )+];

            /// The label as reports, metrics and the trail spell it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

pub(crate) use labels;

#[cfg(test)]
mod tests {
    labels! {
        /// A test enum.
        pub enum Sample {
            One => "one",
            TwoWords => "two-words",
        }
    }

    #[test]
    fn one_spelling_everywhere() {
        assert_eq!(Sample::ALL, &[Sample::One, Sample::TwoWords]);
        assert_eq!(Sample::TwoWords.as_str(), "two-words");
        assert_eq!(Sample::TwoWords.to_string(), "two-words");
        assert_eq!(
            serde_json::to_string(&Sample::TwoWords).expect("json"),
            "\"two-words\""
        );
    }
}
