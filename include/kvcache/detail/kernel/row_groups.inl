// kvcache: the kernel's one loop over the rows of a unit in groups. Included by
// detail/kernel/variants.hpp first inside each variant's namespace and target region, so a
// body compiled for the variant inlines into it. (No include guard and no includes, for that
// reason: variants.hpp brings them.)

/// Rows [0, num_rows) in groups of Group rows: body(std::integral_constant<int, Group>{}, row)
/// for each whole group from row 0, then body(std::integral_constant<int, 1>{}, row) for each
/// row left. A body's path for Rows rows keeps Rows rows' accumulators in registers and loads
/// each key or value once for all of them; the count as a type lets it unroll over the rows.
template <int Group, class Body>
KVCACHE_ALWAYS_INLINE void for_row_groups(Index num_rows, Body&& body) {
  static_assert(Group >= 1, "for_row_groups: a group holds at least one row");
  Index row = 0;
  for (; row + Group <= num_rows; row += Group) body(std::integral_constant<int, Group>{}, row);
  for (; row < num_rows; ++row) body(std::integral_constant<int, 1>{}, row);
}
